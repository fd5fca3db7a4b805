//! cryo-coordinator: the `cryo` command and the per-job coordinator.
//!
//! The binary (`src/main.rs`) only parses arguments and calls [`cli::run`].
//!
//! * [`session`]: `cryo run`: start the agents and the launcher, then the
//!   event loop. `running` holds the job's state and reacts to each event;
//!   `peers` accepts agents and clients; `agents` starts the agents;
//!   `commit` publishes manifests off the event thread; `signals` turns
//!   SIGUSR1/SIGTERM/SIGINT into checkpoints and preemptions.
//! * [`epoch`]: one epoch's state machine, free of I/O.
//! * [`cli`], [`report`], [`inspect`], [`holdings`], [`human`]: the `cryo`
//!   commands and what they print.
//! * [`launch`], [`export`], [`registry`], [`logging`]: launchers and what
//!   they carry to other hosts, the job's registry in the store, logs.
//! * [`store_dir`]: where the store is when nobody says.
#![deny(missing_docs)]

mod agent_links;
pub mod agent_paths;
mod agents;
pub mod cli;
mod commit;
pub mod epoch;
pub mod export;
pub mod gone_files;
pub mod holdings;
pub mod host_room;
pub mod human;
pub mod inspect;
mod interval;
pub mod job_client;
pub mod job_name;
pub mod launch;
pub mod launch_args;
pub mod launcher_choice;
mod link_loss;
pub mod logging;
pub mod pack_view;
mod peers;
mod preemption;
pub mod program;
pub mod program_mpi;
mod refusal;
pub mod registry;
pub mod report;
mod requeue;
pub mod restart_epoch;
pub mod resume;
mod running;
#[cfg(test)]
mod running_fixture;
pub mod session;
mod signals;
mod slurm_store;
pub mod srun;
pub mod store_dir;
mod strays;
