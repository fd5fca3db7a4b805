//! `scripts/install.sh` gives a tree that applications' build systems find:
//! the C heat2d builds from it with pkg-config and with CMake, links the
//! installed runtime, and runs under the installed `cryo` with a checkpoint.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cryo_tests::{assert_same_file, build_packages, lines, output_text, wait_until, Heat2dFiles};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Runs `cmd` as a user's shell would: `cargo test` puts the build tree's
/// library folders on `LD_LIBRARY_PATH`, which would hide the installed
/// runtime.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.env_remove("LD_LIBRARY_PATH").output().unwrap();
    assert!(out.status.success(), "{cmd:?}:\n{}", output_text(&out));
    out
}

/// Installs the debug build into `prefix`.
fn install(prefix: &Path) {
    let bins = build_packages(&["cryo-coordinator", "cryo-agent", "cryo-rank", "cryo-slurm"]);
    run(Command::new("bash")
        .arg(root().join("scripts/install.sh"))
        .arg("--prefix")
        .arg(prefix)
        .args(["--profile", "debug", "--no-build"])
        .env("CARGO_TARGET_DIR", bins.parent().unwrap()));
}

/// Where the dynamic loader finds `libcryo_rank.so` for `program`.
fn runtime_of(program: &Path) -> String {
    let out = run(Command::new("ldd").arg(program));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("libcryo_rank"))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn an_installed_tree_builds_with_pkg_config_and_cmake_and_runs() {
    let prefix = tempfile::tempdir().unwrap();
    let prefix = prefix.path();
    install(prefix);
    for file in [
        "bin/cryo",
        "bin/cryo-agent",
        "lib/libcryo_rank.so",
        "lib/libcryo_rank.a",
        "include/cryo.h",
        "lib/cryo/spank_cryo.so",
        "lib/pkgconfig/cryo.pc",
        "lib/cmake/cryo/cryoConfig.cmake",
        "lib/cmake/cryo/cryoConfigVersion.cmake",
        "include/cryo.mod",
        "lib/libcryo_fortran.a",
        "share/cryo/fortran/cryo.F90",
        "lib/cryo/python/cryo/__init__.py",
        // A link to the runtime beside the package, where it looks first.
        "lib/cryo/python/cryo/libcryo_rank.so",
    ] {
        assert!(prefix.join(file).is_file(), "{file} is not installed");
    }
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let heat2d_c = root().join("examples/c/heat2d.c");

    // pkg-config.
    let pkg_config_path = prefix.join("lib/pkgconfig");
    let flags = run(Command::new("pkg-config")
        .args(["--cflags", "--libs", "cryo"])
        .env("PKG_CONFIG_PATH", &pkg_config_path));
    let flags = String::from_utf8_lossy(&flags.stdout).into_owned();
    let with_pkg_config = work.join("heat2d-pkg-config");
    run(Command::new("mpicc")
        .args(["-O2", "-Wall", "-Werror", "-o"])
        .arg(&with_pkg_config)
        .arg(&heat2d_c)
        .args(flags.split_whitespace())
        .arg("-lm"));

    // CMake.
    let project = work.join("cmake-project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::copy(&heat2d_c, project.join("heat2d.c")).unwrap();
    std::fs::write(
        project.join("CMakeLists.txt"),
        "cmake_minimum_required(VERSION 3.16)\n\
         project(heat2d C)\n\
         find_package(MPI REQUIRED COMPONENTS C)\n\
         find_package(cryo 0.1 REQUIRED)\n\
         if(NOT \"mpich\" IN_LIST cryo_MPI_FLAVOURS)\n\
           message(FATAL_ERROR \"no MPICH runtime: ${cryo_MPI_FLAVOURS}\")\n\
         endif()\n\
         add_executable(heat2d heat2d.c)\n\
         target_link_libraries(heat2d PRIVATE cryo::rank MPI::MPI_C m)\n",
    )
    .unwrap();
    let build = project.join("build");
    run(Command::new("cmake")
        .arg("-S")
        .arg(&project)
        .arg("-B")
        .arg(&build)
        .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display())));
    run(Command::new("cmake").arg("--build").arg(&build));
    let with_cmake = build.join("heat2d");

    let installed = prefix.join("lib/libcryo_rank.so");
    for program in [&with_pkg_config, &with_cmake] {
        let found = runtime_of(program);
        assert!(
            found.contains(&installed.display().to_string()),
            "{} must load the installed runtime: {found}",
            program.display()
        );
    }

    // Both run the same, alone (no agent) and under the installed `cryo`
    // with a checkpoint.
    let files = Heat2dFiles::new("cryo-install-", &with_pkg_config);
    run(Command::new("mpiexec")
        .args(["-n", "2"])
        .arg(&with_pkg_config)
        .args(files.app_args("reference", 0))
        .env_remove("CRYO_AGENT_SOCKET"));
    let mut job = Command::new(prefix.join("bin/cryo"))
        .args(["run", "--job", "installed", "--nodes", "a:1,b:1", "-n", "2"])
        .arg("--store")
        .arg(files.path("store"))
        .arg("--scratch")
        .arg(files.path("scratch"))
        .arg("--")
        .arg(&with_cmake)
        .args(files.app_args("run", 20))
        .env_remove("CRYO_STORE")
        .env_remove("LD_LIBRARY_PATH")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(files.path("run.stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_until("the job to compute", Duration::from_secs(60), || {
        lines(&files.path("run.log")) >= 5
    });
    let checkpoint = run(Command::new(prefix.join("bin/cryo"))
        .args(["checkpoint", "installed", "--store"])
        .arg(files.path("store")));
    assert!(
        output_text(&checkpoint).contains("epoch 1 committed"),
        "{}",
        output_text(&checkpoint)
    );
    let status = job.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(files.path("run.stderr")).unwrap_or_default()
    );
    assert_same_file(&files.path("reference.log"), &files.path("run.log"));
    assert_same_file(&files.path("reference.out"), &files.path("run.out"));

    // `use cryo` from the installed module: the Fortran heat2d, whose
    // output is the C one's byte for byte.
    let fortran = work.join("heat2d-fortran");
    let include = format!("-I{}", prefix.join("include").display());
    let libs = format!("-L{}", prefix.join("lib").display());
    let rpath = format!("-Wl,-rpath,{}", prefix.join("lib").display());
    run(Command::new("mpif90.mpich")
        .args(["-O2", "-o"])
        .arg(&fortran)
        .arg(&include)
        .arg(root().join("examples/fortran/heat2d.f90"))
        .args([&libs, "-lcryo_fortran", "-lcryo_rank", &rpath]));
    assert!(
        runtime_of(&fortran).contains(&installed.display().to_string()),
        "{}",
        runtime_of(&fortran)
    );
    run(Command::new("mpiexec")
        .args(["-n", "2"])
        .arg(&fortran)
        .args(files.app_args("fortran", 0))
        .env_remove("CRYO_AGENT_SOCKET"));
    assert_same_file(&files.path("reference.log"), &files.path("fortran.log"));
    assert_same_file(&files.path("reference.out"), &files.path("fortran.out"));

    // `import cryo` from the installed package finds the installed runtime.
    let python = run(Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import os, cryo; print(os.path.realpath(os.path.join(os.path.dirname(cryo.__file__), 'libcryo_rank.so')))",
        ])
        .env("PYTHONPATH", prefix.join("lib/cryo/python"))
        .env_remove("CRYO_RANK_LIB"));
    assert_eq!(
        String::from_utf8_lossy(&python.stdout).trim(),
        installed.canonicalize().unwrap().display().to_string()
    );
}
