//! models/fetch.py against a throwaway catalog with a local-path source:
//! verification, skipping what is verified, and clear errors.

use crate::util::repo;
use std::process::Command;

fn run(catalog: &str, models: &std::path::Path, args: &[&str]) -> (bool, String) {
    let dir = models.parent().unwrap();
    let cat = dir.join("catalog.toml");
    std::fs::write(&cat, catalog).unwrap();
    let out = Command::new("python3")
        .arg(repo().join("models/fetch.py"))
        .args(args)
        .env("ERRAND_CATALOG", &cat)
        .env("ERRAND_MODELS", models)
        .env("ERRAND_HOME", dir)
        .output()
        .expect("python3 is needed to fetch models");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn local_source_is_verified_installed_and_then_skipped() {
    let dir = std::env::temp_dir().join(format!("errand-fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("weights.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let models = dir.join("models");
    let catalog = format!(
        "default_chat = \"m\"\ntest_chat = \"m\"\n[[models]]\nname = \"m\"\nrole = \"chat\"\narch = \"llama\"\nformat = \"gguf\"\ndescription = \"test\"\n[[models.files]]\nname = \"m.gguf\"\nsha256 = \"{}\"\nlocal_path = \"{}\"\n",
        sha256_hex(&data),
        src.display()
    );
    let (ok, out) = run(&catalog, &models, &["m"]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(models.join("m/m.gguf")).unwrap(), data);
    assert!(!models.join("m/m.gguf.partial").exists());
    let (ok, out) = run(&catalog, &models, &["m"]);
    assert!(ok && out.contains("present and verified"), "{out}");

    // A wrong pin: nothing is installed and the message says so.
    std::fs::remove_dir_all(&models).unwrap();
    let bad = catalog.replace(&sha256_hex(&data), &"0".repeat(64));
    let (ok, out) = run(&bad, &models, &["m"]);
    assert!(!ok && out.contains("checksum mismatch") && out.contains("Nothing was installed"), "{out}");
    assert!(!models.join("m/m.gguf").exists() && !models.join("m/m.gguf.partial").exists());

    let (ok, out) = run(&catalog, &models, &["nope"]);
    assert!(!ok && out.contains("unknown model"), "{out}");
    let missing = catalog.replace(&src.display().to_string(), "/no/such/file");
    let (ok, out) = run(&missing, &models, &["m"]);
    assert!(!ok && out.contains("does not exist"), "{out}");
}
