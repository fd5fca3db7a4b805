//! Reads the version of the Slurm whose headers are installed: Slurm
//! refuses a SPANK plugin that declares another release.
use std::path::PathBuf;

fn main() {
    let header = std::env::var_os("SLURM_INCLUDE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include"))
        .join("slurm/slurm_version.h");
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rerun-if-env-changed=SLURM_INCLUDE_DIR");
    let text = std::fs::read_to_string(&header).unwrap_or_else(|err| {
        panic!(
            "cannot read {}: {err}; install libslurm-dev (scripts/install-deps.sh does)",
            header.display()
        )
    });
    let version = text
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("#define") && words.next() == Some("SLURM_VERSION_NUMBER"))
                .then(|| words.next())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no SLURM_VERSION_NUMBER in {}", header.display()));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("slurm_version.rs"), format!("{version}\n"))
        .expect("writing slurm_version.rs");
}
