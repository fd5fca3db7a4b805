//! cryo-bench: cryo's benchmarks, kept out of the shipped `cryo` and
//! `cryo-agent` binaries (they hand `cryo bench` and `cryo-agent bench` over
//! to the `cryo-bench` binary).
//!
//! * [`suite`]: the whole suite (`cryo-bench`), its report and fits.
//! * [`store`]: store throughput against the `zstd` CLI (`cryo-bench store`).
//! * [`store_ops`]: the store's metadata operations, format 1 beside
//!   format 2, counted (`cryo-bench store`).
//! * [`agent`]: checkpoint and restart of real ranks by a real agent
//!   (`cryo-bench agent`).
//! * [`cold_restart`]: a restart from a store out of the page cache, with
//!   and without the ranks' prefetch (`cryo-bench cold-restart`).
//! * [`start`]: a job's start and end under `cryo run` against its
//!   launcher alone (`cryo-bench start`).
//! * [`figures`]: one configuration's figures, as the agent driver writes
//!   them and the suite reports them.
//! * [`plot`]: the suite's SVG.
//! * [`synth`]: synthetic rank state shaped like a solver's memory (also
//!   `cryo-counter --state-kind mixed`).
//!
//! They measure, and never fail on a missed target.
#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

pub mod agent;
pub mod cold_restart;
pub mod figures;
pub mod first_pause;
pub mod first_request;
pub mod plot;
pub mod quiesce_jobs;
pub mod start;
pub mod store;
pub mod store_ops;
pub mod suite;
pub mod synth;
