//! The MPI binding: [`Collectives`] over `mpi::ffi`, on two private
//! duplicates of the application's communicator (one for agreements, one
//! for rings) and the application's own, probed for messages in flight.
//! It also carries the restart's exchange of closed-file tables.
//! Every MPI call the quiesce makes is in this file.

use std::mem::ManuallyDrop;
use std::os::raw::c_int;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use ::mpi::ffi;

use super::agreement::{CallError, Collectives, InFlight, Reduce};

/// How long a rank keeps looking for a message in flight once the ranks
/// agreed to park. MPI does not promise that a message sent before the
/// sender's arrival is visible to the receiver's `MPI_Iprobe` when the
/// arrive step completes (it may travel another path); a short window
/// catches those that were sent. The rank looks once before the check and
/// for the rest of the window while it is parked (`LateProbe` in
/// `mod.rs`), so the window overlaps the agent's copy instead of adding to
/// the pause.
pub const PROBE_WINDOW: Duration = Duration::from_millis(2);

/// The tag of a ring on the bell communicator (the only tag used there).
const TAG_RING: c_int = 7;

fn check(code: c_int, call: &'static str) -> Result<(), CallError> {
    if i64::from(code) == i64::from(ffi::MPI_SUCCESS) {
        Ok(())
    } else {
        Err(CallError { call, code })
    }
}

/// Whether `MPI_Init` has been called.
pub(crate) fn initialized() -> bool {
    let mut initialised = 0;
    // SAFETY: MPI_Initialized may be called at any time; the flag is a valid
    // out-parameter.
    unsafe { ffi::MPI_Initialized(&mut initialised) };
    initialised != 0
}

/// Whether `MPI_Finalize` has been called: no MPI call may follow.
pub(crate) fn finalized() -> bool {
    let mut finalized = 0;
    // SAFETY: MPI_Finalized may be called at any time, even after
    // MPI_Finalize; the flag is a valid out-parameter.
    unsafe { ffi::MPI_Finalized(&mut finalized) };
    finalized != 0
}

/// The quiesce's MPI state: its communicators and the bell.
pub(crate) struct Mpi {
    /// Private duplicate for agreements: they never match the
    /// application's messages or collectives.
    agree_comm: ffi::MPI_Comm,
    /// Private duplicate for rings only.
    bell_comm: ffi::MPI_Comm,
    /// The application's communicator, probed for messages in flight.
    app_comm: ffi::MPI_Comm,
    rank: i32,
    size: i32,
    /// The receive kept posted for a peer's ring.
    bell: Bell,
    /// The fence that ends a park, once started (see [`Mpi::start_fence`]).
    fence: Option<Collective<1>>,
}

// SAFETY: `Send` is needed only because the quiesce state lives in a static
// `Mutex`. The fields are MPI handles and plain integers. With MPICH every
// handle is an `int` and this impl adds nothing. With Open MPI (the
// `libcryo_rank_openmpi` flavour, the same code) a handle is a raw pointer:
// `agree_comm`, `bell_comm` and the bell's request point to objects
// `MPI_Comm_dup`/`MPI_Irecv` allocated in the library's heap, which stay
// valid until `MPI_Comm_free`/completion, whichever thread asks; `app_comm`
// may point to a predefined object (`ompi_mpi_comm_world`), a global of the
// library. Rust never dereferences a handle of either kind: it only passes
// it back to MPI, and neither library ties a handle to the thread that
// created it (no thread-local objects behind them). What MPI does restrict
// is which threads may call it, and when: every call through these handles
// is made under that `Mutex` (one call at a time, as
// `MPI_THREAD_SERIALIZED` asks), from the safe point or `finalize`, which
// the application calls from the thread that makes its MPI calls (the
// contract of `init_mpi_raw`, as `MPI_THREAD_FUNNELED` asks).
unsafe impl Send for Mpi {}

impl Mpi {
    /// Duplicates `comm` twice for the runtime's private use.
    ///
    /// # Safety
    /// `comm` must be a valid communicator of an initialised MPI library,
    /// used by this thread, and it must outlive the returned value.
    pub(crate) unsafe fn attach(comm: ffi::MPI_Comm) -> Result<Mpi, CallError> {
        let mut agree_comm: ffi::MPI_Comm = comm;
        let mut bell_comm: ffi::MPI_Comm = comm;
        let mut rank = 0;
        let mut size = 0;
        // SAFETY: `comm` is valid per the contract; the handles and integers
        // are out-parameters that live across the calls.
        unsafe {
            check(ffi::MPI_Comm_dup(comm, &mut agree_comm), "MPI_Comm_dup")?;
            check(ffi::MPI_Comm_dup(comm, &mut bell_comm), "MPI_Comm_dup")?;
            // One blocking allreduce on the agreements' communicator: MPI
            // sets a communicator's collectives up on first use, and a first
            // join that pays for it takes many safe points.
            let (send, mut recv) = (0u64, 0u64);
            check(
                ffi::MPI_Allreduce(
                    std::ptr::from_ref(&send).cast(),
                    std::ptr::from_mut(&mut recv).cast(),
                    1,
                    ffi::RSMPI_UINT64_T,
                    ffi::RSMPI_MAX,
                    agree_comm,
                ),
                "MPI_Allreduce",
            )?;
            check(ffi::MPI_Comm_rank(comm, &mut rank), "MPI_Comm_rank")?;
            check(ffi::MPI_Comm_size(comm, &mut size), "MPI_Comm_size")?;
        }
        Ok(Mpi {
            agree_comm,
            bell_comm,
            app_comm: comm,
            rank,
            size,
            bell: Bell {
                // SAFETY: see RSMPI's docs: MPI_REQUEST_NULL is a valid
                // initial value.
                request: unsafe { ffi::RSMPI_REQUEST_NULL },
                rung: false,
            },
            fence: None,
        })
    }

    /// This rank in the communicator.
    pub(crate) fn rank(&self) -> i32 {
        self.rank
    }

    /// The communicator's size.
    pub(crate) fn size(&self) -> i32 {
        self.size
    }

    /// Starts the fence that ends a park (once per park): an allreduce on
    /// the agreements' communicator that every rank of the agreement starts
    /// when its look for messages in flight is over. No rank computes on
    /// before it completes, so no message of the next iteration can be
    /// taken for one in flight.
    ///
    /// A fence an earlier park left pending is completed first: every rank
    /// started it before this park's agreement, which has completed, so it
    /// completes too, and the ranks' collectives stay in the same order.
    pub(crate) fn start_fence(&mut self) -> Result<(), CallError> {
        let mut polls = 0;
        while !self.fence_passed()? {
            super::between_polls(&mut polls);
        }
        self.fence = Some(Collective::start(self.agree_comm, [0], Reduce::Max)?);
        Ok(())
    }

    /// Tests the fence once, if one is pending: whether none is now (a
    /// completed fence is gone).
    pub(crate) fn fence_passed(&mut self) -> Result<bool, CallError> {
        let passed = match self.fence.as_mut() {
            Some(fence) => fence.test()?,
            None => true,
        };
        if passed {
            self.fence = None;
        }
        Ok(passed)
    }

    /// Posts the bell: from now on a peer's ring is received.
    pub(crate) fn listen(&mut self) -> Result<(), CallError> {
        self.bell.post(self.bell_comm)
    }

    /// Retires the bell and frees the private communicators, after the
    /// rank's last agreement (no ring is left to receive: the check counted
    /// them all).
    pub(crate) fn close(&mut self) {
        // Every rank started a fence left pending before the last
        // agreement, which has completed: it completes too, given progress.
        let started = Instant::now();
        let mut polls = 0;
        while self.fence.is_some() && started.elapsed() < Duration::from_secs(1) {
            if self.fence_passed().is_err() {
                break;
            }
            super::between_polls(&mut polls);
        }
        if !self.bell.rung {
            // SAFETY: the posted receive is live; cancelling and then
            // completing it is how a receive that no message will match is
            // retired.
            unsafe {
                ffi::MPI_Cancel(&mut self.bell.request);
                ffi::MPI_Wait(&mut self.bell.request, ffi::RSMPI_STATUS_IGNORE);
            }
        }
        // SAFETY: our own duplicates, no longer used.
        unsafe {
            ffi::MPI_Comm_free(&mut self.agree_comm);
            ffi::MPI_Comm_free(&mut self.bell_comm);
        }
    }
}

/// The restart's exchange of closed-file tables, on the agreements'
/// communicator, blocking: it runs once, inside `cryo_init_mpi`.
impl crate::closed_files::Peers for Mpi {
    fn exchange(&mut self, words: &[u64]) -> Result<Vec<Vec<u64>>, String> {
        let ranks = usize::try_from(self.size).map_err(|_| "a negative communicator size")?;
        let mine = c_int::try_from(words.len()).map_err(|_| "too many words to exchange")?;
        let mut counts: Vec<c_int> = vec![0; ranks];
        // SAFETY: one int sent, one per rank received into `counts`, which
        // has `size` slots; the communicator is our live duplicate.
        let code = unsafe {
            ffi::MPI_Allgather(
                std::ptr::from_ref(&mine).cast(),
                1,
                ffi::RSMPI_INT32_T,
                counts.as_mut_ptr().cast(),
                1,
                ffi::RSMPI_INT32_T,
                self.agree_comm,
            )
        };
        check(code, "MPI_Allgather").map_err(|e| e.to_string())?;
        let mut displs: Vec<c_int> = Vec::with_capacity(ranks);
        let mut total: c_int = 0;
        for &count in &counts {
            if count < 0 {
                return Err("a peer sent a negative count".into());
            }
            displs.push(total);
            total = total
                .checked_add(count)
                .ok_or("the exchanged tables are too large")?;
        }
        let mut all = vec![0u64; usize::try_from(total).unwrap_or(0)];
        // SAFETY: `words` holds `mine` words; `all` holds the sum of
        // `counts`, each rank's at its displacement; same communicator.
        let code = unsafe {
            ffi::MPI_Allgatherv(
                words.as_ptr().cast(),
                mine,
                ffi::RSMPI_UINT64_T,
                all.as_mut_ptr().cast(),
                counts.as_ptr(),
                displs.as_ptr(),
                ffi::RSMPI_UINT64_T,
                self.agree_comm,
            )
        };
        check(code, "MPI_Allgatherv").map_err(|e| e.to_string())?;
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&count, &at)| {
                let at = usize::try_from(at).unwrap_or(0);
                all[at..at + usize::try_from(count).unwrap_or(0)].to_vec()
            })
            .collect())
    }

    fn barrier(&mut self) -> Result<(), String> {
        // SAFETY: our live duplicate.
        let code = unsafe { ffi::MPI_Barrier(self.agree_comm) };
        check(code, "MPI_Barrier").map_err(|e| e.to_string())
    }
}

/// The receive a rank keeps posted for an empty ring message.
struct Bell {
    request: ffi::MPI_Request,
    /// The posted receive matched a ring (consumed; reposted after the
    /// agreement's check).
    rung: bool,
}

impl Bell {
    fn post(&mut self, comm: ffi::MPI_Comm) -> Result<(), CallError> {
        self.rung = false;
        // SAFETY: an empty receive: MPI never touches the (dangling, non-null)
        // buffer; `request` is a valid out-parameter.
        let code = unsafe {
            ffi::MPI_Irecv(
                NonNull::<u64>::dangling().as_ptr().cast(),
                0,
                ffi::RSMPI_UINT64_T,
                ffi::RSMPI_ANY_SOURCE,
                TAG_RING,
                comm,
                &mut self.request,
            )
        };
        check(code, "MPI_Irecv")
    }

    /// One `MPI_Test` of the posted receive: whether a ring came.
    fn look(&mut self) -> Result<bool, CallError> {
        if self.rung {
            return Ok(false);
        }
        let mut done = 0;
        // SAFETY: the request is live; `done` is a valid out-parameter.
        let code = unsafe { ffi::MPI_Test(&mut self.request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
        check(code, "MPI_Test")?;
        self.rung = done != 0;
        Ok(self.rung)
    }
}

/// The buffers of one allreduce, at an address fixed while MPI owns them.
struct Buffers<const N: usize> {
    send: [u64; N],
    recv: [u64; N],
}

/// One `MPI_Iallreduce` of `N` words in flight, with its request and the
/// buffers MPI reads and writes until it completes.
pub(crate) struct Collective<const N: usize> {
    request: ffi::MPI_Request,
    /// Freed by `Drop` only once MPI is done with them.
    buffers: ManuallyDrop<Box<Buffers<N>>>,
    done: bool,
}

// SAFETY: as for `Mpi`: the request is a handle (an `int` in MPICH, a
// pointer to a request object the library allocated in Open MPI), only
// passed back to MPI under the quiesce's `Mutex`, never dereferenced by
// Rust; the buffers are a plain heap allocation owned by this value.
unsafe impl<const N: usize> Send for Collective<N> {}

impl<const N: usize> Collective<N> {
    fn start(comm: ffi::MPI_Comm, words: [u64; N], reduce: Reduce) -> Result<Self, CallError> {
        let mut collective = Collective {
            // SAFETY: see RSMPI's docs: MPI_REQUEST_NULL is a valid initial
            // value.
            request: unsafe { ffi::RSMPI_REQUEST_NULL },
            buffers: ManuallyDrop::new(Box::new(Buffers {
                send: words,
                recv: [0; N],
            })),
            done: false,
        };
        let count = c_int::try_from(N).unwrap_or(c_int::MAX);
        let buffers: &mut Buffers<N> = &mut collective.buffers;
        // SAFETY: the buffers are boxed and owned by the collective, and
        // `Drop` frees them only once the request has completed (see
        // there); the communicator is private to the quiesce.
        let code = unsafe {
            ffi::MPI_Iallreduce(
                buffers.send.as_ptr().cast(),
                buffers.recv.as_mut_ptr().cast(),
                count,
                ffi::RSMPI_UINT64_T,
                match reduce {
                    Reduce::Max => ffi::RSMPI_MAX,
                    Reduce::Sum => ffi::RSMPI_SUM,
                },
                comm,
                &mut collective.request,
            )
        };
        check(code, "MPI_Iallreduce")?;
        Ok(collective)
    }

    /// One `MPI_Test`: whether it has completed.
    fn test(&mut self) -> Result<bool, CallError> {
        if !self.done {
            let mut done = 0;
            // SAFETY: the request is live (owned here; a completed request
            // is never tested again); `done` is a valid out-parameter.
            let code =
                unsafe { ffi::MPI_Test(&mut self.request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
            check(code, "MPI_Test")?;
            self.done = done != 0;
        }
        Ok(self.done)
    }
}

impl<const N: usize> Drop for Collective<N> {
    /// Every agreement runs to its end (in `finalize` at the latest), so a
    /// collective is normally dropped complete. One dropped before (an MPI
    /// call failed mid-agreement) is tested once more, unless MPI has been
    /// finalized; if it is still in flight its buffers are leaked, never
    /// freed: MPI may still write them. Not waiting, because a peer that
    /// never starts the collective would hang this rank in a destructor;
    /// not cancelling or freeing the request, because the MPI standard makes
    /// `MPI_Cancel` and `MPI_Request_free` erroneous for a non-blocking
    /// collective. The leak is two arrays of a few words, on a failure path.
    fn drop(&mut self) {
        let complete = self.done || (!finalized() && self.test().unwrap_or(false));
        if complete {
            // SAFETY: the request has completed, so MPI no longer refers to
            // the buffers; they are dropped once, here, and not used after.
            unsafe { ManuallyDrop::drop(&mut self.buffers) };
        }
    }
}

impl Collectives for Mpi {
    type Pending<const N: usize> = Collective<N>;

    fn start<const N: usize>(
        &mut self,
        reduce: Reduce,
        words: [u64; N],
    ) -> Result<Collective<N>, CallError> {
        Collective::start(self.agree_comm, words, reduce)
    }

    fn test<const N: usize>(
        &mut self,
        pending: &mut Collective<N>,
    ) -> Result<Option<[u64; N]>, CallError> {
        Ok(pending.test()?.then(|| pending.buffers.recv))
    }

    fn at_target(&mut self, epoch: u64) {
        crate::park::flush_output(u32::try_from(self.rank).unwrap_or(u32::MAX), epoch);
    }

    /// One `MPI_Iprobe` of the application's communicator, any source, any
    /// tag: before the check, and then while parked for the rest of the
    /// window (`LateProbe`).
    fn probe(&mut self) -> Result<Option<InFlight>, CallError> {
        let mut pending = 0;
        // SAFETY: a zeroed MPI_Status is a valid out-parameter.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        // SAFETY: the application's communicator is live; out-parameters
        // valid.
        let code = unsafe {
            ffi::MPI_Iprobe(
                ffi::RSMPI_ANY_SOURCE,
                ffi::RSMPI_ANY_TAG,
                self.app_comm,
                &mut pending,
                &mut status,
            )
        };
        check(code, "MPI_Iprobe")?;
        Ok((pending != 0).then_some(InFlight {
            source: status.MPI_SOURCE,
            tag: status.MPI_TAG,
        }))
    }

    /// Sends an empty ring to every other rank. The sends are freed at
    /// once: an empty message owns no buffer, and its receipt is counted by
    /// the check.
    fn ring(&mut self) -> Result<(), CallError> {
        for peer in (0..self.size).filter(|peer| *peer != self.rank) {
            // SAFETY: see RSMPI's docs: MPI_REQUEST_NULL is a valid initial
            // value.
            let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
            // SAFETY: an empty send: MPI never touches the (dangling,
            // non-null) buffer; freeing the request of a point-to-point send
            // lets it complete on its own.
            unsafe {
                check(
                    ffi::MPI_Isend(
                        NonNull::<u64>::dangling().as_ptr().cast(),
                        0,
                        ffi::RSMPI_UINT64_T,
                        peer,
                        TAG_RING,
                        self.bell_comm,
                        &mut request,
                    ),
                    "MPI_Isend",
                )?;
                check(ffi::MPI_Request_free(&mut request), "MPI_Request_free")?;
            }
        }
        Ok(())
    }

    fn bell_rang(&mut self) -> Result<bool, CallError> {
        self.bell.look()
    }

    /// Every rank that rang sent one ring to each of the others, before it
    /// started the check: they have all been sent, and waiting for them
    /// ends.
    fn collect_rings(&mut self, mut rings: u64) -> Result<(), CallError> {
        if rings > 0 && !self.bell.rung {
            // SAFETY: the posted receive is live; it matches a ring.
            let code = unsafe { ffi::MPI_Wait(&mut self.bell.request, ffi::RSMPI_STATUS_IGNORE) };
            check(code, "MPI_Wait")?;
            self.bell.rung = true;
        }
        if self.bell.rung {
            rings = rings.saturating_sub(1);
        }
        for _ in 0..rings {
            // SAFETY: an empty receive (MPI never touches the dangling,
            // non-null buffer) of a ring that was sent before its sender
            // started the check.
            let code = unsafe {
                ffi::MPI_Recv(
                    NonNull::<u64>::dangling().as_ptr().cast(),
                    0,
                    ffi::RSMPI_UINT64_T,
                    ffi::RSMPI_ANY_SOURCE,
                    TAG_RING,
                    self.bell_comm,
                    ffi::RSMPI_STATUS_IGNORE,
                )
            };
            check(code, "MPI_Recv")?;
        }
        if self.bell.rung {
            self.bell.post(self.bell_comm)?;
        }
        Ok(())
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}
