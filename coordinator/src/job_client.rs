//! `cryo checkpoint`, `preempt` and `status`: a request to a running job's
//! coordinator, and its answer.
//!
//! A coordinator that is stopped (Ctrl-Z, SIGSTOP, a debugger) or hung
//! still has its kernel accept the connection and take the request, but it
//! answers nothing; one whose host is cut off does not even do that. So
//! each step has a bound: the connection ([`CONNECT_TIMEOUT`]), the
//! handshake ([`auth::HANDSHAKE_TIMEOUT`]) and a status's answer
//! ([`STATUS_TIMEOUT`]). A checkpoint or a preemption is answered only
//! once it is over (a whole epoch, or the job's end), so its wait has no
//! bound of its own; the link is watched instead, so that a host that goes
//! away is noticed within the link timeout.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use cryo_core::auth::{self, ControlHandshakeError};
use cryo_core::liveness;
use cryo_core::protocol::{read_message, write_message_as, FrameError, JobRequest, JobResponse};
use cryo_core::store::{Store, StoreError};
use cryo_core::token::JobToken;
use thiserror::Error;

use crate::registry::{hostname, Registry};

/// How long `cryo` tries to connect to a coordinator.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `cryo status` waits for its answer once the handshake is done:
/// the event loop answers at once unless it is stuck.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// A request that got no answer.
#[derive(Debug, Error)]
pub enum AskError {
    /// No connection could be made.
    #[error("connecting to {whom}: {source}")]
    Connect {
        /// The coordinator, for people.
        whom: String,
        /// The last error.
        source: std::io::Error,
    },
    /// A step found nothing to read within its bound: the coordinator
    /// runs no more, or not as it should.
    #[error(
        "{whom} accepted the connection but did not {step} within {} s: it is stopped, hung, \
         or cut off from here (a stopped process shows state T in `ps -o stat= -p PID` on its \
         host)",
        waited.as_secs()
    )]
    Silent {
        /// The coordinator, for people.
        whom: String,
        /// What it did not do.
        step: &'static str,
        /// How long `cryo` waited.
        waited: Duration,
    },
    /// The handshake failed otherwise.
    #[error("{whom}: {source}")]
    Handshake {
        /// The coordinator, for people.
        whom: String,
        /// What failed.
        source: ControlHandshakeError,
    },
    /// The coordinator exits as the job ends: a request that raced the end
    /// finds the connection closed.
    #[error(
        "{whom} closed the connection without answering: the job has ended or is stopping \
         (`cryo status {job}` says whether it still runs; `cryo ls` on its store lists its \
         epochs)"
    )]
    Closed {
        /// The coordinator, for people.
        whom: String,
        /// The job.
        job: String,
    },
    /// Sending the request or reading the answer failed.
    #[error("{whom}: {step}: {source}")]
    Exchange {
        /// The coordinator, for people.
        whom: String,
        /// The step.
        step: &'static str,
        /// What failed.
        source: FrameError,
    },
}

/// Sends a request to a running job's coordinator and waits for the answer.
pub fn request(store: &Path, job: &str, request: JobRequest) -> Result<JobResponse> {
    let store = Store::open(store)?;
    let job_store = match store.existing_job(job) {
        Err(StoreError::UnknownJob { store, .. }) => anyhow::bail!(
            "no job {job:?} runs with the store {} (it holds no such job; `cryo ls {}` lists those it holds)",
            store.display(),
            store.display()
        ),
        other => other?,
    };
    let registry = Registry::of(&job_store);
    let addr = registry.coordinator(job)?;
    let token = registry.token()?;
    let whom = format!(
        "job {job:?}'s coordinator at {} (pid {} on {})",
        addr.addr, addr.pid, addr.host
    );
    let bounds = Bounds {
        connect: CONNECT_TIMEOUT,
        handshake: auth::HANDSHAKE_TIMEOUT,
        status: STATUS_TIMEOUT,
    };
    Ok(ask(&addr.addr, &whom, job, &token, &request, &bounds)?)
}

/// How long each step may take.
struct Bounds {
    connect: Duration,
    handshake: Duration,
    status: Duration,
}

/// Connects to `addr`, proves `token`, sends `request` and reads the answer,
/// each step within its bound.
fn ask(
    addr: &str,
    whom: &str,
    job: &str,
    token: &JobToken,
    request: &JobRequest,
    bounds: &Bounds,
) -> Result<JobResponse, AskError> {
    let whom = whom.to_owned();
    let stream =
        liveness::connect_within(addr, bounds.connect).map_err(|source| AskError::Connect {
            whom: whom.clone(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let silent = |step, waited| AskError::Silent {
        whom: whom.clone(),
        step,
        waited,
    };
    let _ = stream.set_read_timeout(Some(bounds.handshake));
    let _ = stream.set_write_timeout(Some(bounds.handshake));
    let client = format!("cryo on {}", hostname());
    let version = auth::greet_as_control(&stream, job, client, token).map_err(|source| {
        if handshake_timed_out(&source) {
            silent("answer the handshake", bounds.handshake)
        } else {
            AskError::Handshake {
                whom: whom.clone(),
                source,
            }
        }
    })?;
    // Each step is reported with its own bound: the request is written
    // under the handshake's, a status's answer read under its own.
    let exchange = |step, waited, source: FrameError| {
        if source.is_timeout() {
            silent(step, waited)
        } else if matches!(source, FrameError::Closed) {
            AskError::Closed {
                whom: whom.clone(),
                job: job.to_owned(),
            }
        } else {
            AskError::Exchange {
                whom: whom.clone(),
                step,
                source,
            }
        }
    };
    write_message_as(&mut &stream, request, version)
        .map_err(|source| exchange("take the request", bounds.handshake, source))?;
    let answer_bound = if matches!(request, JobRequest::Status) {
        let _ = stream.set_read_timeout(Some(bounds.status));
        bounds.status
    } else {
        // Answered when the epoch or the job is over: no bound, but a
        // host that goes away closes the link within the link timeout.
        let _ = stream.set_read_timeout(None);
        liveness::watch_link(&stream, liveness::link_timeout())
            .unwrap_or_else(|_| liveness::link_timeout())
    };
    read_message::<JobResponse>(&mut &stream)
        .map_err(|source| exchange("answer", answer_bound, source))
}

fn handshake_timed_out(err: &ControlHandshakeError) -> bool {
    match err {
        ControlHandshakeError::Hello(source) | ControlHandshakeError::Answer(source) => {
            source.is_timeout()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::TcpListener;
    use std::time::Instant;

    use cryo_core::protocol::{read_message, write_message, Hello};

    use super::*;

    fn token() -> JobToken {
        JobToken::parse(&"ef".repeat(32), "test").unwrap()
    }

    fn short() -> Bounds {
        Bounds {
            connect: Duration::from_secs(2),
            handshake: Duration::from_millis(300),
            status: Duration::from_millis(700),
        }
    }

    #[test]
    fn a_coordinator_that_never_answers_the_handshake_is_named_not_waited_for() {
        // Listening, as a stopped process's kernel still does, but never
        // accepting.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let start = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let asked = status_of(&addr);
            let _ = tx.send(asked);
        });
        let err = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the request must give up, not wait forever")
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(
            matches!(
                err,
                AskError::Silent {
                    step: "answer the handshake",
                    ..
                }
            ),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with(
                "the coordinator accepted the connection but did not answer the handshake"
            ) && text.contains("stopped, hung"),
            "{text}"
        );
        drop(listener);
    }

    /// A status request to the coordinator at `addr`, under short bounds.
    fn status_of(addr: &str) -> Result<JobResponse, AskError> {
        ask(
            addr,
            "the coordinator",
            "j",
            &token(),
            &JobRequest::Status,
            &short(),
        )
    }

    /// The coordinator's side up to the request: accepts, checks the
    /// proof, reads the request.
    fn take_request(listener: &TcpListener) -> std::net::TcpStream {
        let (stream, _) = listener.accept().unwrap();
        let hello: Hello = read_message(&mut &stream).unwrap();
        let (nonce, proof) = auth::challenge(&mut &stream).unwrap();
        assert!(auth::verify(&token(), &nonce, &hello, &proof).is_ok());
        let _: JobRequest = read_message(&mut &stream).unwrap();
        stream
    }

    /// A coordinator that greets, then sits on the request.
    fn greets_then_sits(listener: TcpListener) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let stream = take_request(&listener);
            // Hold the connection until the client gives up.
            let _ = read_message::<JobRequest>(&mut &stream);
        })
    }

    #[test]
    fn a_status_that_gets_no_answer_is_named_after_its_bound() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let coordinator = greets_then_sits(listener);
        let err = status_of(&addr).unwrap_err();
        // Named after the answer's own bound, not the handshake's.
        assert!(
            matches!(err, AskError::Silent { step: "answer", waited, .. } if waited == short().status),
            "{err}"
        );
        coordinator.join().unwrap();
    }

    #[test]
    fn an_answer_is_read_and_a_close_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let coordinator = std::thread::spawn(move || {
            for answer in [true, false] {
                let stream = take_request(&listener);
                if answer {
                    let refused = JobResponse::Refused {
                        reason: "busy".into(),
                    };
                    write_message(&mut &stream, &refused).unwrap();
                }
            }
        });
        let answer = ask(&addr, "c", "j", &token(), &JobRequest::Checkpoint, &short()).unwrap();
        assert_eq!(
            answer,
            JobResponse::Refused {
                reason: "busy".into()
            }
        );
        let err = ask(&addr, "c", "j", &token(), &JobRequest::Checkpoint, &short()).unwrap_err();
        assert!(matches!(err, AskError::Closed { .. }), "{err}");
        coordinator.join().unwrap();
    }

    #[test]
    fn nothing_listening_is_a_connection_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = status_of(&format!("127.0.0.1:{port}")).unwrap_err();
        assert!(matches!(err, AskError::Connect { .. }), "{err}");
    }
}
