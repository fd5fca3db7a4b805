//! `cryo`: checkpoint/restart for MPI jobs.

use std::process::ExitCode;

fn main() -> ExitCode {
    cryo_coordinator::cli::main()
}
