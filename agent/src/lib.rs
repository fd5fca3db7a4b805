//! cryo-agent: the node agent. One daemon per node captures the local ranks
//! at a checkpoint (fd table, mappings, region memory copied with
//! `process_vm_readv` into a pre-faulted buffer pool, then hashed, compressed
//! and stored in the background) and hands restart information to ranks that
//! register after a restart was armed.
//!
//! * [`server`]: the daemon's connections (ranks registering, the accept
//!   loop); `control` answers control clients, `coordinated` follows the
//!   coordinator.
//! * [`epoch`]: one checkpoint epoch on this node: the slot, the per-rank
//!   body, and where its progress goes (standalone or coordinated).
//! * [`config`]: the agent's settings.
//! * [`capture`]: capturing one parked rank within the copy budget.
//! * [`children`]: a rank's child processes, named at a checkpoint.
//! * [`gate`]: the order of a node's ranks in one epoch (turns to copy,
//!   compression once every rank resumed).
//! * [`pool`]: the copy budget as pre-faulted, reused slots; [`memory`]:
//!   its default size.
//! * [`self_copy`]: a parked rank copying its own memory into the budget.
//! * [`procfs`]: `/proc` parsing and process access behind a trait.
//! * [`client`]: the control client used by the CLI, tests and benchmarks.
//! * [`link`]: coordinated mode's TCP link to the job's coordinator.
//! * [`units`]: byte sizes on the command line.
#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

mod armed;
pub mod attrs;
pub mod capture;
pub mod children;
pub mod client;
pub mod config;
mod control;
mod coordinated;
pub mod epoch;
pub mod fds;
pub mod gate;
mod heartbeat;
mod inputs;
pub mod link;
pub mod memory;
pub mod node_local;
pub mod pool;
pub mod procfs;
mod ranks;
mod roster;
pub mod self_copy;
pub mod server;
pub mod snapshot;
mod stream;
mod termination;
mod tracking;
pub mod units;
mod warming;
mod warning;
