//! One error enum per operation, each message naming the rank, the region,
//! the file or the epoch concerned.

use std::io;
use std::path::PathBuf;

use cryo_core::names::NameError;
use cryo_core::protocol::FrameError;
use cryo_core::store::reader::RegionReadError;
use cryo_core::store::{LoadError, StoreError};
use nix::errno::Errno;
use thiserror::Error;

/// `init` failed.
#[derive(Debug, Error)]
pub enum InitError {
    /// `init` was already called in this process.
    #[error(
        "cryo is already initialized in this process (cryo_init or cryo_init_mpi is \
         called once per process, and not again after cryo_finalize; an MPI program calls \
         cryo_init_mpi instead of cryo_init)"
    )]
    AlreadyInitialized,
    /// An environment variable has a bad value.
    #[error("environment variable {var}={value:?}: {why}")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// The placeholder fds below the floor could not be made.
    #[error("cannot keep fd numbers below {floor} free of the application's files ({source}); set CRYO_FD_FLOOR=0 to turn this off")]
    FdFloor {
        /// The floor.
        floor: i32,
        /// The OS error.
        source: Errno,
    },
    /// The region reservation could not be made.
    #[error("cannot reserve {len:#x} bytes for regions at {base:#x}: {source}; the range is taken by {occupant} (set CRYO_REGION_BASE to another address)")]
    Reserve {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
        /// What already lives there, from /proc/self/maps.
        occupant: String,
        /// The OS error.
        source: Errno,
    },
    /// The node agent's socket could not be reached.
    #[error("rank {rank}: cannot connect to the cryo agent at {}: {source}", path.display())]
    Connect {
        /// The rank.
        rank: u32,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Setting up the control page failed.
    #[error("rank {rank}: control page: {step}: {source}")]
    ControlPage {
        /// The rank.
        rank: u32,
        /// The step (`memfd_create`, `ftruncate`, `mmap`, `fcntl`).
        step: &'static str,
        /// The OS error.
        source: Errno,
    },
    /// Talking to the agent failed.
    #[error("rank {rank}: registering with the cryo agent: {source}")]
    Protocol {
        /// The rank.
        rank: u32,
        /// What went wrong.
        source: FrameError,
    },
    /// The agent closed the connection without an answer.
    #[error("rank {rank}: the cryo agent closed the connection as the rank registered ({source}): an agent of another cryo version does so (this runtime speaks protocol {version}; its log says which it accepts), as does one that is stopping")]
    AgentClosed {
        /// The rank.
        rank: u32,
        /// The runtime's protocol version.
        version: u16,
        /// How it closed.
        source: FrameError,
    },
    /// The agent refused the registration.
    #[error("rank {rank}: the cryo agent refused registration: {reason}")]
    Refused {
        /// The rank.
        rank: u32,
        /// Why.
        reason: String,
    },
    /// The agent answered something unexpected.
    #[error("rank {rank}: unexpected answer from the cryo agent: {what}")]
    Unexpected {
        /// The rank.
        rank: u32,
        /// What arrived.
        what: String,
    },
    /// Restoring from a checkpoint failed.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// MPI is not usable for the quiesce protocol.
    #[error("MPI: {0}")]
    Mpi(String),
    /// The program's MPI is not the one this build of the runtime was built
    /// for (an Open MPI program linked with the MPICH flavour, or the
    /// reverse): its communicator handles have another size.
    #[error("this program's MPI_Comm is {program_bytes} bytes ({program} handles), but this libcryo_rank was built for {built} ({built_bytes}-byte handles): link {wanted} instead")]
    WrongMpi {
        /// The MPI family the program's handle size stands for.
        program: &'static str,
        /// `sizeof(MPI_Comm)` in the program.
        program_bytes: usize,
        /// The MPI family this runtime was built for.
        built: &'static str,
        /// `sizeof(MPI_Comm)` in the MPI this runtime was built against.
        built_bytes: usize,
        /// The library file of the flavour the program needs.
        wanted: &'static str,
    },
    /// The communicator handed to `cryo_init_mpi` is `MPI_COMM_NULL` (or,
    /// from Fortran, a handle `MPI_Comm_f2c` does not know).
    #[error("MPI: the communicator is MPI_COMM_NULL; pass MPI_COMM_WORLD or a communicator of every rank that checkpoints")]
    NullCommunicator,
}

/// Restoring a rank's files or loading its record failed.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// The store could not be opened.
    #[error("rank {rank}: restart from epoch {epoch}: {source}")]
    Store {
        /// The rank.
        rank: u32,
        /// The epoch.
        epoch: u64,
        /// Why.
        source: StoreError,
    },
    /// The manifest could not be loaded.
    #[error("rank {rank}: restart from epoch {epoch}: {source}")]
    Manifest {
        /// The rank.
        rank: u32,
        /// The epoch.
        epoch: u64,
        /// Why.
        source: LoadError,
    },
    /// The agent offered an image of another job.
    #[error("rank {rank}: refusing to restore epoch {epoch} of job {offered:?}: this rank belongs to job {ours:?}")]
    OtherJob {
        /// The rank.
        rank: u32,
        /// The epoch.
        epoch: u64,
        /// The job the image belongs to.
        offered: String,
        /// The rank's own job (`CRYO_JOB`).
        ours: String,
    },
    /// The epoch has no record of this rank.
    #[error("rank {rank}: epoch {epoch} of job {job:?} has no record of this rank (world size {world_size})")]
    RankMissing {
        /// The rank.
        rank: u32,
        /// The epoch.
        epoch: u64,
        /// The job.
        job: String,
        /// The epoch's world size.
        world_size: u32,
    },
    /// A file open at checkpoint no longer exists.
    #[error("rank {rank}: cannot restore fd {fd}: file {path} vanished since the checkpoint")]
    FileVanished {
        /// The rank.
        rank: u32,
        /// The fd.
        fd: i32,
        /// The file.
        path: String,
    },
    /// The file at an fd's path is not the one the rank held: its last
    /// bytes as of the checkpoint differ (`FileTail`).
    #[error("rank {rank}: cannot restore fd {fd}: {path} is not the file the rank held at the checkpoint (its {len} bytes before byte {end} differ): it was replaced or rewritten since (a log rotated away and begun again, an input staged again with other contents). Put the job's file back at that path, or set CRYO_FILE_POLICY=keep to go on with the file there as it is")]
    FileReplaced {
        /// The rank.
        rank: u32,
        /// The fd.
        fd: i32,
        /// The file.
        path: String,
        /// Bytes compared.
        len: u32,
        /// Where they end: the file's size at the checkpoint.
        end: u64,
    },
    /// A file is now shorter than the saved offset.
    #[error("rank {rank}: cannot restore fd {fd}: file {path} shrank to {size} bytes, below the saved offset {offset}")]
    FileShrank {
        /// The rank.
        rank: u32,
        /// The fd.
        fd: i32,
        /// The file.
        path: String,
        /// Its size now.
        size: u64,
        /// The saved offset.
        offset: u64,
    },
    /// The fd number is held by something else in the new process (the
    /// MPI library or the launcher opened it before `cryo_init`).
    #[error("rank {rank}: cannot restore fd {fd} ({path}): the new process already uses fd {fd} for {occupant}: its MPI library or launcher opened more fds before cryo_init than the checkpointed run's did, past CRYO_FD_FLOOR; start jobs with a higher CRYO_FD_FLOOR")]
    FdTaken {
        /// The rank.
        rank: u32,
        /// The fd.
        fd: i32,
        /// The file to restore there.
        path: String,
        /// What holds the number now.
        occupant: String,
    },
    /// A saved path is no longer what it was (a directory where a file
    /// was, or the other way round).
    #[error("rank {rank}: cannot restore fd {fd}: {path} is no longer a {expected}")]
    FileChanged {
        /// The rank.
        rank: u32,
        /// The fd.
        fd: i32,
        /// The path.
        path: String,
        /// What it was (`regular file`, `directory`).
        expected: &'static str,
    },
    /// The saved contents of an unlinked file or of a file mapping could
    /// not be read back.
    #[error("rank {rank}: restoring {what}: {source}")]
    Contents {
        /// The rank.
        rank: u32,
        /// What was being restored.
        what: String,
        /// Why.
        source: cryo_core::store::reader::RegionReadError,
    },
    /// An application file mapping could not be re-established.
    #[error("rank {rank}: cannot restore the mapping of {path} at {addr:#x} ({len} bytes): {step}: {source}")]
    Mapping {
        /// The rank.
        rank: u32,
        /// The file.
        path: String,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
        /// The step (`open`, `mmap`, `mprotect`).
        step: &'static str,
        /// Why.
        source: io::Error,
    },
    /// A system call on a file failed.
    #[error("rank {rank}: restoring fd {fd} ({path}): {step}: {source}")]
    FileIo {
        /// The rank.
        rank: u32,
        /// The fd.
        fd: i32,
        /// The file.
        path: String,
        /// The step (`open`, `dup2`, `lseek`, `ftruncate`).
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A file of the node the rank ran on, missing here, could not be made
    /// again from its saved contents.
    #[error("rank {rank}: making {path} again from its saved contents (it was on a filesystem of the node the rank ran on): {step}: {source}")]
    RemakeIo {
        /// The rank.
        rank: u32,
        /// The file.
        path: String,
        /// The step.
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A file of the node the rank wrote is here with other bytes than it
    /// saved, and cannot be written to put them back.
    #[error("rank {rank}: {path}, a file of its node it wrote, is here with other bytes than the checkpoint saved, and cannot be opened to put them back: {source}; restart with CRYO_FILE_POLICY=keep to go on with the file as it is")]
    PutBack {
        /// The rank.
        rank: u32,
        /// The file.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The working directory the rank had at the checkpoint could not be
    /// returned to.
    #[error("rank {rank}: returning to its working directory {path}: {step}: {source}")]
    WorkingDirectory {
        /// The rank.
        rank: u32,
        /// The directory.
        path: String,
        /// The step.
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The table of files the rank wrote and closed is damaged.
    #[error("rank {rank}: the checkpoint's table of files written and closed is damaged: {why}")]
    ClosedFiles {
        /// The rank.
        rank: u32,
        /// What is wrong with it.
        why: String,
    },
    /// The record of what the rank changed of its process is damaged.
    #[error("rank {rank}: the checkpoint's record of the process's environment, limits and signals is damaged: {source}")]
    ProcessState {
        /// The rank.
        rank: u32,
        /// What is wrong with it.
        source: cryo_core::format::process_state::ProcessStateError,
    },
    /// The ranks could not exchange what they restored.
    #[error("rank {rank}: exchanging the restart with the other ranks: {why}")]
    Peers {
        /// The rank.
        rank: u32,
        /// The MPI call that failed.
        why: String,
    },
    /// Another rank's restore failed (it names its own reason).
    #[error("rank {rank}: rank {peer} could not restore its checkpoint, so the job cannot go on (its own error, on its stderr as `cryo: rank {peer}: …`, says why)")]
    PeerFailed {
        /// The rank.
        rank: u32,
        /// The rank that failed (its index in the communicator).
        peer: u32,
    },
}

/// Creating, registering or restoring a region failed.
#[derive(Debug, Error)]
pub enum RegionError {
    /// `init` has not been called.
    #[error("cryo is not initialized: call init first")]
    NotInitialized,
    /// A bad region name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The name is already used.
    #[error("rank {rank}: region {name:?} already exists")]
    Duplicate {
        /// The rank.
        rank: u32,
        /// The region.
        name: String,
    },
    /// A zero length.
    #[error("rank {rank}: region {name:?} has zero length")]
    ZeroLength {
        /// The rank.
        rank: u32,
        /// The region.
        name: String,
    },
    /// The reservation has no room left.
    #[error("rank {rank}: region {name:?} of {len} bytes does not fit: {left} bytes of the region reservation are left")]
    ReservationFull {
        /// The rank.
        rank: u32,
        /// The region.
        name: String,
        /// Requested length.
        len: u64,
        /// Room left.
        left: u64,
    },
    /// A mapping failed.
    #[error("rank {rank}: region {name:?}: {step}: {source}")]
    Map {
        /// The rank.
        rank: u32,
        /// The region.
        name: String,
        /// The step.
        step: &'static str,
        /// The OS error.
        source: Errno,
    },
    /// The backing file could not be used.
    #[error("rank {rank}: region {name:?}: {step} {}: {source}", path.display())]
    File {
        /// The rank.
        rank: u32,
        /// The region.
        name: String,
        /// The file.
        path: PathBuf,
        /// The step.
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The backing file is too small or the offset is bad.
    #[error("rank {rank}: region {name:?}: {problem}")]
    BadFile {
        /// The rank.
        rank: u32,
        /// The region.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A buffer given to `protect` is not all writable memory (a `const`
    /// table, memory made read-only): a restart could not write it back.
    #[error(
        "rank {rank}: region {name:?}: {len} bytes at {addr:#x} are not all writable memory: \
         {problem}; a restart could not put its contents back (protect only memory the \
         program writes)"
    )]
    NotWritable {
        /// The rank.
        rank: u32,
        /// The region.
        name: String,
        /// The buffer's address.
        addr: u64,
        /// Its length.
        len: u64,
        /// What in it is not writable.
        problem: String,
    },
    /// The region does not match the one saved in the checkpoint.
    #[error("rank {rank}: region {name:?} does not match epoch {epoch}: {problem}")]
    Mismatch {
        /// The rank.
        rank: u32,
        /// The region.
        name: String,
        /// The epoch.
        epoch: u64,
        /// What differs.
        problem: String,
    },
    /// The saved contents could not be read back.
    #[error("rank {rank}: restoring region from epoch {epoch}: {source}")]
    Restore {
        /// The rank.
        rank: u32,
        /// The epoch.
        epoch: u64,
        /// Why (names the region, the chunk and what is wrong with it).
        source: RegionReadError,
    },
}

/// A safe point failed.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// Talking to the agent failed while parked.
    #[error("rank {rank}: checkpoint of epoch {epoch}: lost the cryo agent: {source}")]
    Agent {
        /// The rank.
        rank: u32,
        /// The epoch.
        epoch: u64,
        /// What went wrong.
        source: FrameError,
    },
    /// The agent answered something unexpected.
    #[error("rank {rank}: checkpoint of epoch {epoch}: unexpected answer from the agent: {what}")]
    Unexpected {
        /// The rank.
        rank: u32,
        /// The epoch.
        epoch: u64,
        /// What arrived.
        what: String,
    },
    /// An MPI call of the quiesce protocol failed.
    #[error("rank {rank}: MPI quiesce failed: {detail}")]
    Mpi {
        /// The rank.
        rank: u32,
        /// Which call and its error.
        detail: String,
    },
}
