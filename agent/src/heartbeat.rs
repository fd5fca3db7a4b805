//! The agent's heartbeat on its link to the coordinator.
//!
//! A stopped or hung agent (SIGSTOP, a debugger, a node swapping hard)
//! still has its kernel acknowledge what the coordinator sends, so TCP's
//! own liveness checks see a healthy link, and an epoch the agent holds
//! would wait out the whole checkpoint timeout. So the agent says it is
//! alive ([`AgentToCoordinator::Alive`]) every
//! [`cryo_core::liveness::heartbeat_interval`]; its coordinator counts it
//! lost once it has heard nothing for the silence limit, and a stopped
//! agent that is let go on finds its link closed and dials in again.
//!
//! The beat runs on a thread of its own, not on a worker's: a checkpoint
//! writing for minutes is not silence.

use std::sync::Weak;
use std::time::Duration;

use cryo_core::protocol::{AgentToCoordinator, HEARTBEAT_VERSION};

use crate::link::CoordinatorLink;

/// Says `link`'s agent is alive every `interval` while the link is up and
/// its coordinator takes heartbeats, until `owner` is dropped or
/// `stopping` says so.
pub(crate) fn beat<T>(
    owner: &Weak<T>,
    link: impl Fn(&T) -> Option<&CoordinatorLink>,
    stopping: impl Fn(&T) -> bool,
    interval: Duration,
) {
    loop {
        std::thread::sleep(interval);
        let Some(owner) = owner.upgrade() else {
            return;
        };
        if stopping(&owner) {
            return;
        }
        let Some(link) = link(&owner) else {
            return;
        };
        // While the link is down the rejoin says hello again, which is
        // as good; an older coordinator would take the beat for garbage.
        if link.is_connected() && link.version() >= HEARTBEAT_VERSION {
            link.send(&AgentToCoordinator::Alive);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use cryo_core::auth;
    use cryo_core::protocol::{read_message, write_message, CoordinatorToAgent, Hello};
    use cryo_core::token::JobToken;

    use super::*;
    use crate::link::connect;

    struct Owner {
        link: CoordinatorLink,
        stopping: AtomicBool,
    }

    #[test]
    fn an_idle_agent_says_it_is_alive_until_it_stops() {
        let token = JobToken::parse(&"cd".repeat(32), "test").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let answer = token.clone();
        let coordinator = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let hello: Hello = read_message(&mut &stream).unwrap();
            let (nonce, proof) = auth::challenge(&mut &stream).unwrap();
            assert!(auth::verify(&answer, &nonce, &hello, &proof).is_ok());
            let welcome = CoordinatorToAgent::Welcome {
                job: "j".into(),
                world_size: 1,
            };
            write_message(&mut &stream, &welcome).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let start = Instant::now();
            for _ in 0..3 {
                let heard: AgentToCoordinator = read_message(&mut &stream).unwrap();
                assert_eq!(heard, AgentToCoordinator::Alive);
            }
            let three = start.elapsed();
            // After the owner says it stops: nothing more, then the close.
            let rest: Vec<AgentToCoordinator> =
                std::iter::from_fn(|| read_message(&mut &stream).ok()).collect();
            (three, rest.len())
        });
        let (link, _reader) = connect(&addr, "j", "n1", &token, Duration::from_secs(5)).unwrap();
        let owner = Arc::new(Owner {
            link,
            stopping: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&owner);
        let beating = std::thread::spawn(move || {
            beat(
                &weak,
                |o| Some(&o.link),
                |o| o.stopping.load(Ordering::Acquire),
                Duration::from_millis(20),
            );
        });
        std::thread::sleep(Duration::from_millis(200));
        owner.stopping.store(true, Ordering::Release);
        beating.join().unwrap();
        owner.link.lost();
        let (three, after) = coordinator.join().unwrap();
        assert!(three < Duration::from_secs(5), "{three:?}");
        // The beats sent before the stop (about ten) may trail in; the
        // thread returned, so they are bounded.
        assert!(after < 20, "{after} beats after the stop");
    }
}
