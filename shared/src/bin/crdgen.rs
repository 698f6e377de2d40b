//! Prints or writes the CRD YAML generated from the Rust types (`make crds`).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match std::env::args().nth(1) {
        Some(dir) => {
            for (file, yaml) in nio_shared::crd::yaml_files()? {
                let path = PathBuf::from(&dir).join(file);
                std::fs::write(&path, yaml)?;
                eprintln!("wrote {}", path.display());
            }
        }
        None => {
            for (_, yaml) in nio_shared::crd::yaml_files()? {
                print!("---\n{yaml}");
            }
        }
    }
    Ok(())
}
