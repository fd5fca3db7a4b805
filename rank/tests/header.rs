//! `rank/include/cryo.h` against the Rust exports in `rank/src/ffi.rs`: the
//! same functions, with the same return types and numbers of parameters,
//! and the same status codes. A C program compiled against the header
//! calls exactly what the library defines.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use cryo_rank::ffi;

fn read(relative: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)).unwrap()
}

/// `name -> (return type, parameter count)` from `text`, where each
/// declaration starts at a `marker` and its parameters end at the first `)`.
fn signatures(
    text: &str,
    marker: &str,
    ret: impl Fn(&str) -> String,
) -> BTreeMap<String, (String, usize)> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some(at) = rest.find(marker) {
        let decl = &rest[at + marker.len()..];
        let name_end = decl.find('(').unwrap();
        let name = decl[..name_end].trim().to_owned();
        let params_end = decl.find(')').unwrap();
        let params = decl[name_end + 1..params_end].trim();
        let count = match params {
            "" | "void" => 0,
            p => p.trim_end_matches(',').split(',').count(),
        };
        out.insert(name, (ret(&rest[..at + marker.len()]), count));
        rest = &decl[params_end..];
    }
    out
}

/// The declarations of `cryo.h`: the line up to `cryo_` is the type. A
/// `static inline` definition counts as a declaration of its name, which
/// the library also exports for programs built against an older header.
fn header_functions(header: &str) -> BTreeMap<String, (String, usize)> {
    let mut found = BTreeMap::new();
    for (index, line) in header.lines().enumerate() {
        let line = line.trim_start();
        let Some(at) = line.find("cryo_") else {
            continue;
        };
        let kind = line[..at].trim().trim_start_matches("static inline ");
        if !matches!(kind, "int" | "uint64_t" | "size_t" | "const char *") || !line.contains('(') {
            continue;
        }
        // Join continuation lines until the closing parenthesis.
        let mut decl: String = line[at..].to_owned();
        let mut next = index + 1;
        while !decl.contains(')') {
            decl.push_str(header.lines().nth(next).unwrap());
            next += 1;
        }
        let marker = "cryo_";
        let parsed = signatures(&decl, marker, |_| kind.to_owned());
        for (name, sig) in parsed {
            found.insert(format!("cryo_{name}"), sig);
        }
    }
    found
}

fn rust_type(c: &str) -> &'static str {
    match c {
        "int" => "c_int",
        "uint64_t" => "u64",
        "size_t" => "usize",
        "const char *" => "*const c_char",
        other => panic!("cryo.h returns {other:?}, which this test does not map"),
    }
}

/// Every status and result code, by its name in `cryo.h` and `cryo.F90`.
const CODES: [(&str, i32); 13] = [
    ("CRYO_OK", ffi::CRYO_OK),
    ("CRYO_ERR_INVALID_ARGUMENT", ffi::CRYO_ERR_INVALID_ARGUMENT),
    ("CRYO_ERR_NOT_INITIALIZED", ffi::CRYO_ERR_NOT_INITIALIZED),
    (
        "CRYO_ERR_ALREADY_INITIALIZED",
        ffi::CRYO_ERR_ALREADY_INITIALIZED,
    ),
    ("CRYO_ERR_AGENT", ffi::CRYO_ERR_AGENT),
    ("CRYO_ERR_REGION", ffi::CRYO_ERR_REGION),
    ("CRYO_ERR_RESTORE", ffi::CRYO_ERR_RESTORE),
    ("CRYO_ERR_CHECKPOINT", ffi::CRYO_ERR_CHECKPOINT),
    ("CRYO_ERR_PANIC", ffi::CRYO_ERR_PANIC),
    ("CRYO_ERR_CONFIG", ffi::CRYO_ERR_CONFIG),
    ("CRYO_CONTINUE", ffi::CRYO_CONTINUE),
    ("CRYO_CHECKPOINTED", ffi::CRYO_CHECKPOINTED),
    ("CRYO_ABORTED", ffi::CRYO_ABORTED),
];

#[test]
fn every_declared_function_is_exported_with_the_same_shape() {
    let header = header_functions(&read("include/cryo.h"));
    let source = read("src/ffi.rs");
    let exports: BTreeMap<String, (String, usize)> =
        signatures(&source, "extern \"C\" fn ", |_| String::new())
            .into_iter()
            .filter(|(name, _)| name.starts_with("cryo_"))
            .map(|(name, (_, count))| {
                let after = &source[source.find(&format!("fn {name}(")).unwrap()..];
                let ret = after[after.find(')').unwrap() + 1..after.find('{').unwrap()]
                    .trim()
                    .trim_start_matches("->")
                    .trim()
                    .to_owned();
                (name, (ret, count))
            })
            .collect();
    assert!(header.len() >= 9, "cryo.h declares {header:?}");
    let names = |m: &BTreeMap<String, (String, usize)>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&header),
        names(&exports),
        "cryo.h and rank/src/ffi.rs name different functions"
    );
    for (name, (c_ret, c_count)) in &header {
        let (rust_ret, rust_count) = &exports[name];
        assert_eq!(rust_type(c_ret), rust_ret, "{name}: return type");
        assert_eq!(c_count, rust_count, "{name}: number of parameters");
    }
}

#[test]
fn status_codes_match() {
    let header = read("include/cryo.h");
    let value = |name: &str| -> i32 {
        let line = header
            .lines()
            .find(|l| {
                let l = l.trim();
                l.starts_with(&format!("{name} ")) || l.starts_with(&format!("#define {name} "))
            })
            .unwrap_or_else(|| panic!("{name} is not in cryo.h"));
        let digits: String = line
            .split(|c: char| c == '=' || c.is_whitespace())
            .rfind(|w| !w.is_empty())
            .unwrap()
            .trim_end_matches(',')
            .to_owned();
        digits.parse().unwrap()
    };
    for (name, code) in CODES {
        assert_eq!(value(name), code, "{name}");
    }
}

/// `rank/fortran/cryo.F90` binds every function of `cryo.h` and gives every
/// code the same value. The C handle's calls (`cryo_init_mpi` and the
/// size-checked `cryo_init_mpi_handle` under it) are bound through
/// `cryo_init_mpi_f`, which takes the Fortran handle; `cryo_mpi_flavour` is
/// for bindings that load the library themselves, and `cryo_note_appended`,
/// `cryo_note_node_file`, `cryo_note_renamed` and `cryo_reopen_restored`
/// for languages whose closes, renames and opens the runtime does not see
/// (it sees Fortran's).
#[test]
fn the_fortran_module_binds_every_call_with_the_same_codes() {
    let module = read("fortran/cryo.F90");
    let header = header_functions(&read("include/cryo.h"));
    let c_only = [
        "cryo_init_mpi",
        "cryo_init_mpi_handle",
        "cryo_mpi_flavour",
        "cryo_note_appended",
        "cryo_note_node_file",
        "cryo_note_renamed",
        "cryo_reopen_restored",
    ];
    for name in header
        .keys()
        .filter(|name| !c_only.contains(&name.as_str()))
    {
        assert!(
            module.contains(&format!("bind(C, name='{name}')")),
            "rank/fortran/cryo.F90 does not bind {name}"
        );
    }
    for (name, code) in CODES {
        let line = format!("integer, parameter, public :: {name} = {code}\n");
        assert!(module.contains(&line), "cryo.F90 lacks {line:?}");
    }
}
