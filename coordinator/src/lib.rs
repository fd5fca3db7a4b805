//! cryo-coordinator: the `cryo` command and the per-job coordinator.
//!
//! The binary (`src/main.rs`) only parses arguments and calls [`cli::run`].
#![deny(missing_docs)]

pub mod cli;
pub mod epoch;
pub mod holdings;
pub mod human;
pub mod inspect;
pub mod launch;
pub mod logging;
pub mod registry;
pub mod session;
