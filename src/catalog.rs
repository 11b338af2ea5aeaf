//! The model catalog (`models/catalog.toml`) and resolving a model spec to
//! files on disk.
//!
//! A spec is one of:
//! - a catalog name (`qwen2.5-coder-0.5b-instruct`), looked up in the model
//!   cache that `models/fetch.py` fills;
//! - a path to a local `.gguf` file;
//! - `hf:OWNER/REPO/FILE.gguf`, a Hugging Face Hub file that
//!   `models/fetch.py --hf` downloads into the cache.
//!
//! Fetching (network, checksums, joining split parts) lives in the Python
//! script so it can run before anything is compiled; this module only finds
//! what it left behind and says exactly which command fetches what is missing.

use serde::Deserialize;
use std::path::{Path, PathBuf};

const CATALOG: &str = include_str!("../models/catalog.toml");

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "model `{name}` is not downloaded (looked for {path}).\n  Fetch it with: python3 models/fetch.py {name}"
    )]
    NotFetched { name: String, path: PathBuf },
    #[error(
        "Hugging Face file `{spec}` is not downloaded (looked for {path}).\n  Fetch it with: python3 models/fetch.py --hf {repo} {file}"
    )]
    HfNotFetched {
        spec: String,
        repo: String,
        file: String,
        path: PathBuf,
    },
    #[error(
        "no model `{0}`: not a catalog name ({1}) and no such file.\n  List the catalog with: python3 models/fetch.py --list"
    )]
    Unknown(String, String),
    #[error("`{0}` is not a valid hf: spec; write hf:OWNER/REPO/FILE.gguf")]
    BadHfSpec(String),
    #[error("the built-in model catalog is invalid: {0}")]
    Catalog(String),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Catalog {
    pub default_chat: String,
    pub test_chat: String,
    pub models: Vec<CatalogModel>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CatalogModel {
    pub name: String,
    pub role: String,
    pub arch: String,
    pub format: String,
    pub description: String,
    /// Not fetched by a plain `models/fetch.py`; name it to fetch it.
    #[serde(default)]
    pub optional: bool,
    pub files: Vec<CatalogFile>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CatalogFile {
    pub name: String,
    pub sha256: String,
}

impl Catalog {
    pub fn builtin() -> Result<Self, CatalogError> {
        toml::from_str(CATALOG).map_err(|e| CatalogError::Catalog(e.to_string()))
    }

    pub fn get(&self, name: &str) -> Option<&CatalogModel> {
        self.models.iter().find(|m| m.name == name)
    }
}

/// `$ERRAND_HOME`, default `~/.cache/errand`.
pub fn errand_home() -> PathBuf {
    std::env::var_os("ERRAND_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| ".".into());
            home.join(".cache").join("errand")
        })
}

/// `$ERRAND_MODELS`, default `$ERRAND_HOME/models` (the same rule as fetch.py).
pub fn models_dir() -> PathBuf {
    std::env::var_os("ERRAND_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| errand_home().join("models"))
}

/// A model resolved to its files.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The catalog name, or the file name for paths.
    pub name: String,
    /// The main weights file (the GGUF for chat models).
    pub path: PathBuf,
    pub dir: PathBuf,
}

pub fn resolve(spec: &str) -> Result<ResolvedModel, CatalogError> {
    resolve_in(spec, &models_dir())
}

pub fn resolve_in(spec: &str, models: &Path) -> Result<ResolvedModel, CatalogError> {
    let catalog = Catalog::builtin()?;
    if let Some(m) = catalog.get(spec) {
        let dir = models.join(&m.name);
        let first = m
            .files
            .first()
            .ok_or_else(|| CatalogError::Catalog(format!("{} lists no files", m.name)))?;
        for f in &m.files {
            let p = dir.join(&f.name);
            if !p.is_file() {
                return Err(CatalogError::NotFetched {
                    name: m.name.clone(),
                    path: p,
                });
            }
        }
        return Ok(ResolvedModel {
            name: m.name.clone(),
            path: dir.join(&first.name),
            dir,
        });
    }
    if let Some(rest) = spec.strip_prefix("hf:") {
        let parts: Vec<&str> = rest.splitn(3, '/').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(CatalogError::BadHfSpec(spec.into()));
        }
        let repo = format!("{}/{}", parts[0], parts[1]);
        let file = parts[2].to_owned();
        // fetch.py stores the file under its base name.
        let base = Path::new(&file).file_name().map(|s| s.to_owned()).unwrap_or_default();
        let dir = models.join("hf").join(parts[0]).join(parts[1]);
        let path = dir.join(base);
        if !path.is_file() {
            return Err(CatalogError::HfNotFetched {
                spec: spec.into(),
                repo,
                file,
                path,
            });
        }
        return Ok(ResolvedModel {
            name: spec.into(),
            path,
            dir,
        });
    }
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(ResolvedModel {
            name: p
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.into()),
            path: p.to_owned(),
            dir: p.parent().map(Path::to_owned).unwrap_or_default(),
        });
    }
    let names: Vec<&str> = catalog.models.iter().map(|m| m.name.as_str()).collect();
    Err(CatalogError::Unknown(spec.into(), names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_parses_and_names_the_four_models() {
        let c = Catalog::builtin().unwrap();
        for n in ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct", "all-minilm-l6-v2"] {
            let m = c.get(n).unwrap_or_else(|| panic!("{n} missing"));
            assert!(m.files.iter().all(|f| f.sha256.len() == 64));
        }
        assert!(c.get(&c.default_chat).is_some_and(|m| !m.optional));
        // The 1.5B is opt-in: a plain fetch leaves its 1.1 GB alone.
        assert!(c.get("qwen2.5-coder-1.5b-instruct").unwrap().optional);
    }

    #[test]
    fn missing_models_name_the_fetch_command() {
        let empty = std::env::temp_dir().join(format!("errand-empty-{}", std::process::id()));
        let e = resolve_in("smollm2-135m-instruct", &empty).unwrap_err().to_string();
        assert!(e.contains("python3 models/fetch.py smollm2-135m-instruct"), "{e}");
        let e = resolve_in("hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/q.gguf", &empty)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--hf Qwen/Qwen2.5-0.5B-Instruct-GGUF q.gguf"), "{e}");
        assert!(resolve_in("hf:nope", &empty).is_err());
        let e = resolve_in("no-such-model", &empty).unwrap_err().to_string();
        assert!(e.contains("--list"), "{e}");
    }

    #[test]
    fn local_paths_resolve_to_themselves() {
        let dir = std::env::temp_dir().join(format!("errand-local-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.gguf");
        std::fs::write(&p, b"x").unwrap();
        let r = resolve_in(p.to_str().unwrap(), &dir).unwrap();
        assert_eq!(r.path, p);
        assert_eq!(r.name, "m.gguf");
    }
}
