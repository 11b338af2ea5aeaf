//! Opening GGUF files and reading their metadata.
//!
//! Everything that touches a GGUF goes through [`GgufFile::open`], so that a
//! missing, truncated, corrupt or unsupported file gives one clear error
//! instead of a panic deep inside a loader.

use candle_core::quantized::gguf_file::{Content, Value};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a readable GGUF file ({reason}); it may be truncated or corrupt: \
         fetch it again with `python3 models/fetch.py`"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: GGUF metadata key `{key}` is missing or has the wrong type")]
    Metadata { path: PathBuf, key: String },
}

/// A GGUF file whose header and metadata have been read; tensors are loaded
/// lazily through [`GgufFile::reader`].
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|source| GgufError::Open {
            path: path.to_owned(),
            source,
        })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| GgufError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        // A truncated download still has a valid header: check that every
        // tensor's data lies inside the file.
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > len {
                return Err(GgufError::Corrupt {
                    path: path.to_owned(),
                    reason: format!("tensor `{name}` ends at byte {end} but the file has {len}"),
                });
            }
        }
        Ok(Self {
            path: path.to_owned(),
            content,
        })
    }

    pub fn reader(&self) -> Result<BufReader<File>, GgufError> {
        File::open(&self.path)
            .map(BufReader::new)
            .map_err(|source| GgufError::Open {
                path: self.path.clone(),
                source,
            })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_owned(),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
            .ok_or_else(|| self.missing(key))
    }

    pub fn u32(&self, key: &str) -> Result<u32, GgufError> {
        self.get(key)
            .and_then(value_as_u64)
            .map(|v| v as u32)
            .ok_or_else(|| self.missing(key))
    }

    pub fn f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.get(key) {
            Some(Value::F32(v)) => Ok(*v),
            Some(Value::F64(v)) => Ok(*v as f32),
            _ => Err(self.missing(key)),
        }
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.to_bool().ok())
    }

    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let arr = self
            .get(key)
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| self.missing(key))?;
        arr.iter()
            .map(|v| v.to_string().map(|s| s.as_str()).map_err(|_| self.missing(key)))
            .collect()
    }

    pub fn ints(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        let arr = self
            .get(key)
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| self.missing(key))?;
        arr.iter()
            .map(|v| value_as_u64(v).map(|x| x as i64).or_else(|| match v {
                Value::I32(x) => Some(*x as i64),
                Value::I64(x) => Some(*x),
                _ => None,
            }))
            .map(|o| o.ok_or_else(|| self.missing(key)))
            .collect()
    }

    /// `general.architecture`, e.g. `qwen2` or `llama`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.str("general.architecture")
    }
}

fn value_as_u64(v: &Value) -> Option<u64> {
    Some(match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I8(x) if *x >= 0 => *x as u64,
        Value::I16(x) if *x >= 0 => *x as u64,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("errand-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.gguf");
        std::fs::write(&p, b"this is not a gguf file at all").unwrap();
        let err = GgufFile::open(&p).err().expect("must fail");
        let msg = err.to_string();
        assert!(msg.contains("not a readable GGUF"), "{msg}");
        assert!(msg.contains("models/fetch.py"), "{msg}");
        let err = GgufFile::open(&dir.join("absent.gguf")).err().unwrap();
        assert!(err.to_string().contains("cannot open"), "{err}");
    }
}
