//! Round trips and every rejection path of the wire protocol.

use std::io::Cursor;
use std::os::fd::AsFd;

use std::os::unix::net::UnixStream;

use super::*;
use crate::format::manifest::RegionKind;

fn hello() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        job: "heat".into(),
        peer: Peer::Rank { rank: 3, pid: 77 },
    }
}

#[test]
fn round_trip_all_messages() {
    let mut buf = Vec::new();
    write_message(&mut buf, &hello()).unwrap();
    let parked = RankToAgent::Parked {
        epoch: 4,
        regions: vec![RegionInfo {
            name: "grid".into(),
            addr: 0x5a00_0000_0000,
            len: 4096,
            kind: RegionKind::Anonymous,
        }],
        runtime_fds: vec![1000, 1001],
        library_fds: vec![0, 1, 2, 5],
        warnings: vec!["a mapping of a deleted file".into()],
    };
    write_message(&mut buf, &parked).unwrap();
    let resume = AgentToRank::Resume { epoch: 4 };
    write_message(&mut buf, &resume).unwrap();
    let request = ControlRequest::Checkpoint {
        full: false,
        epoch: None,
        if_busy: BusyPolicy::Wait,
        until: Completion::Committed,
    };
    write_message(&mut buf, &request).unwrap();
    let warned = RankToAgent::Warned { signal: 10 };
    write_message(&mut buf, &warned).unwrap();
    let warning = JobRequest::Warning {
        from: "SIGUSR1 to rank 3 on node n2".into(),
    };
    write_message(&mut buf, &warning).unwrap();
    let terminated = JobRequest::Terminated {
        from: "SIGTERM to rank 0 on node n1".into(),
    };
    write_message(&mut buf, &terminated).unwrap();
    let held = AgentToRank::Held { epoch: 5 };
    write_message(&mut buf, &held).unwrap();
    let mut r = Cursor::new(buf);
    assert_eq!(read_message::<Hello>(&mut r).unwrap(), hello());
    assert_eq!(read_message::<RankToAgent>(&mut r).unwrap(), parked);
    assert_eq!(read_message::<AgentToRank>(&mut r).unwrap(), resume);
    assert_eq!(read_message::<ControlRequest>(&mut r).unwrap(), request);
    assert_eq!(read_message::<RankToAgent>(&mut r).unwrap(), warned);
    assert_eq!(read_message::<JobRequest>(&mut r).unwrap(), warning);
    assert_eq!(read_message::<JobRequest>(&mut r).unwrap(), terminated);
    assert_eq!(read_message::<AgentToRank>(&mut r).unwrap(), held);
    assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));
}

fn header_bytes(version: u16, command: u16, flags: u32, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&command.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out
}

#[test]
fn bad_magic_is_refused() {
    let mut bytes = encode_frame(&hello()).unwrap();
    bytes[0] = b'X';
    let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
    assert!(matches!(err, FrameError::BadMagic(_)), "{err}");
}

#[test]
fn command_zero_and_unknown_commands_are_refused() {
    for command in [0u16, 12, u16::MAX] {
        let bytes = header_bytes(PROTOCOL_VERSION, command, 0, 0);
        let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
        assert!(
            matches!(err, FrameError::InvalidCommand(c) if c == command),
            "{err}"
        );
    }
}

#[test]
fn unsupported_versions_are_refused() {
    for (version, command) in [
        (0u16, Command::Hello),
        (PROTOCOL_VERSION + 1, Command::Challenge),
        (PROTOCOL_VERSION + 1, Command::RankToAgent),
    ] {
        let bytes = header_bytes(version, command as u16, 0, 0);
        let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
        assert!(
            matches!(err, FrameError::UnsupportedVersion { .. }),
            "{err}"
        );
    }
    // A newer peer's hello is read and accepted (it is answered in this
    // build's version); nothing else of that version is.
    let mut newer = hello();
    newer.version = PROTOCOL_VERSION + 1;
    assert!(newer.check_version().is_ok());
    let bytes = header_bytes(PROTOCOL_VERSION + 1, Command::Hello as u16, 0, 0);
    assert!(read_frame(&mut Cursor::new(bytes)).is_ok());
    assert!(hello().check_version().is_ok());
    // Version 1 hellos carried the token itself: refused, and said why.
    let mut v1 = hello();
    v1.version = 1;
    let err = v1.check_version().unwrap_err();
    assert!(
        matches!(err, FrameError::UnauthenticatedHello { found: 1 }),
        "{err}"
    );
    assert!(err.to_string().contains("challenge-response"), "{err}");
}

#[test]
fn unknown_flags_are_refused() {
    let bytes = header_bytes(PROTOCOL_VERSION, 1, 4, 0);
    let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
    assert!(matches!(err, FrameError::UnknownFlags(4)), "{err}");
}

#[test]
fn oversized_frame_is_refused_before_allocating() {
    // No payload follows: a reader that allocated and read would report
    // truncation instead.
    let bytes = header_bytes(PROTOCOL_VERSION, 1, 0, u32::MAX);
    let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
    assert!(
        matches!(err, FrameError::Oversized { len } if len == u64::from(u32::MAX)),
        "{err}"
    );
    let bytes = header_bytes(PROTOCOL_VERSION, 1, 0, MAX_PAYLOAD + 1);
    assert!(matches!(
        read_frame(&mut Cursor::new(bytes)),
        Err(FrameError::Oversized { .. })
    ));
}

#[test]
fn truncated_frames_are_refused() {
    let bytes = encode_frame(&hello()).unwrap();
    for cut in [1, FRAME_HEADER_LEN - 1, FRAME_HEADER_LEN, bytes.len() - 1] {
        let err = read_frame(&mut Cursor::new(bytes[..cut].to_vec())).unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { .. }),
            "cut {cut}: {err}"
        );
        assert!(err.is_disconnect());
    }
    assert!(matches!(
        read_frame(&mut Cursor::new(Vec::new())),
        Err(FrameError::Closed)
    ));
}

#[test]
fn wrong_message_kind_is_refused() {
    let bytes = encode_frame(&hello()).unwrap();
    let err = read_message::<ControlRequest>(&mut Cursor::new(bytes)).unwrap_err();
    assert!(
        matches!(
            err,
            FrameError::UnexpectedCommand {
                expected: Command::ControlRequest,
                found: Command::Hello
            }
        ),
        "{err}"
    );
}

#[test]
fn garbage_payload_is_refused() {
    let mut bytes = header_bytes(PROTOCOL_VERSION, Command::RankToAgent as u16, 0, 8);
    bytes.extend_from_slice(&[0xff; 8]);
    let err = read_message::<RankToAgent>(&mut Cursor::new(bytes)).unwrap_err();
    assert!(matches!(err, FrameError::Codec { .. }), "{err}");

    // A payload whose string length prefix is hostile.
    let mut bytes = header_bytes(PROTOCOL_VERSION, Command::Hello as u16, 0, 10);
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let err = read_message::<Hello>(&mut Cursor::new(bytes)).unwrap_err();
    assert!(matches!(err, FrameError::Codec { .. }), "{err}");
}

#[test]
fn header_round_trip() {
    let header = FrameHeader {
        version: PROTOCOL_VERSION,
        command: Command::ControlResponse,
        flags: 0,
        len: 1234,
    };
    assert_eq!(FrameHeader::decode(&header.encode()).unwrap(), header);
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
        let _ = read_frame(&mut Cursor::new(bytes.clone()));
        let _ = read_message::<Hello>(&mut Cursor::new(bytes.clone()));
        let _ = read_message::<ControlResponse>(&mut Cursor::new(bytes));
    }

    #[test]
    fn valid_header_with_arbitrary_payload_never_panics(
        command in 1u16..=5,
        payload in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
    ) {
        let mut bytes = header_bytes(PROTOCOL_VERSION, command, 0, payload.len() as u32);
        bytes.extend_from_slice(&payload);
        let frame = read_frame(&mut Cursor::new(bytes)).unwrap();
        let _ = frame.decode::<Hello>();
        let _ = frame.decode::<RankToAgent>();
        let _ = frame.decode::<AgentToRank>();
        let _ = frame.decode::<ControlRequest>();
        let _ = frame.decode::<ControlResponse>();
    }

    #[test]
    fn parked_round_trips(
        epoch in 1u64..,
        names in proptest::collection::vec("[a-z]{1,12}", 0..8),
        addr in proptest::num::u64::ANY,
    ) {
        let msg = RankToAgent::Parked {
            epoch,
            regions: names
                .iter()
                .map(|name| RegionInfo { name: name.clone(), addr, len: 4096, kind: RegionKind::Protected })
                .collect(),
            runtime_fds: vec![1000, 1001],
            library_fds: vec![],
            warnings: vec![],
        };
        let bytes = encode_frame(&msg).unwrap();
        proptest::prop_assert_eq!(read_message::<RankToAgent>(&mut Cursor::new(bytes)).unwrap(), msg);
    }
}

#[test]
fn fd_passing_over_a_socket_pair() {
    let (a, b) = UnixStream::pair().unwrap();
    let file = tempfile::tempfile().unwrap();
    send_message_with_fd(&a, &hello(), file.as_fd()).unwrap();
    write_message(&mut &a, &RankToAgent::Goodbye).unwrap();
    let (msg, fd) = recv_message_with_fd::<Hello>(&b).unwrap();
    assert_eq!(msg, hello());
    assert!(fd.is_some());
    assert_eq!(
        read_message::<RankToAgent>(&mut &b).unwrap(),
        RankToAgent::Goodbye
    );
    // no fd on a plain frame
    write_message(&mut &a, &hello()).unwrap();
    let (_, fd) = recv_message_with_fd::<Hello>(&b).unwrap();
    assert!(fd.is_none());
    drop(a);
    assert!(matches!(
        recv_message_with_fd::<Hello>(&b),
        Err(FrameError::Closed)
    ));
}

/// A version 4 peer's frame, written in its own layout.
fn v4_frame<Old: serde::Serialize>(command: Command, old: &Old) -> Vec<u8> {
    let payload = crate::format::codec::encode(old).unwrap();
    let mut bytes = header_bytes(4, command as u16, 0, payload.len() as u32);
    bytes.extend_from_slice(&payload);
    bytes
}

#[test]
fn a_version_4_agents_text_reason_is_read_as_text() {
    let bytes = v4_frame(
        Command::AgentToCoordinator,
        &v4::AgentToCoordinator::Failed {
            epoch: 9,
            reason: "node a: rank 3 did not reach a safe point".into(),
        },
    );
    let msg = read_message::<AgentToCoordinator>(&mut Cursor::new(bytes)).unwrap();
    assert_eq!(
        msg,
        AgentToCoordinator::Failed {
            epoch: 9,
            reason: AbortReason::Text("node a: rank 3 did not reach a safe point".into()),
        }
    );
    // Variants that did not change read the same in both layouts.
    let registered = AgentToCoordinator::RankRegistered {
        rank: 2,
        pid: 40,
        restored_epoch: Some(3),
    };
    let old = v4_frame(
        Command::AgentToCoordinator,
        &v4::AgentToCoordinator::from(&v13::AgentToCoordinator::from(&registered)),
    );
    assert_eq!(
        read_message::<AgentToCoordinator>(&mut Cursor::new(old)).unwrap(),
        registered
    );
}

#[test]
fn a_version_4_peer_is_answered_in_its_own_layout() {
    let reason = AbortReason::ParkTimeout {
        rank: 1,
        waited_ms: 500,
    }
    .on_node("b");
    let abort = CoordinatorToAgent::Abort {
        epoch: 4,
        reason: reason.clone(),
    };
    let frame = encode_frame_as(&abort, 4).unwrap();
    let header = FrameHeader::decode(frame[..FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
    assert_eq!(
        header.version, 4,
        "the header must be one a v4 peer accepts"
    );
    let old: v4::CoordinatorToAgent =
        crate::format::codec::decode(&frame[FRAME_HEADER_LEN..]).unwrap();
    match old {
        v4::CoordinatorToAgent::Abort {
            epoch: 4,
            reason: text,
        } => {
            assert_eq!(text, reason.to_string());
        }
        other => panic!("{other:?}"),
    }
    // This build's own peers keep the variant.
    let mut buf = Vec::new();
    write_message(&mut buf, &abort).unwrap();
    assert_eq!(
        read_message::<CoordinatorToAgent>(&mut Cursor::new(buf)).unwrap(),
        abort
    );
    // Every changed response type round-trips at both versions.
    let responses = [
        (
            encode_frame_as(
                &JobResponse::Aborted {
                    epoch: 2,
                    reason: reason.clone(),
                },
                4,
            )
            .unwrap(),
            JobResponse::Aborted {
                epoch: 2,
                reason: AbortReason::Text(reason.to_string()),
            },
        ),
        (
            encode_frame_as(
                &JobResponse::Aborted {
                    epoch: 2,
                    reason: reason.clone(),
                },
                PROTOCOL_VERSION,
            )
            .unwrap(),
            JobResponse::Aborted {
                epoch: 2,
                reason: reason.clone(),
            },
        ),
    ];
    for (frame, expected) in responses {
        assert_eq!(
            read_message::<JobResponse>(&mut Cursor::new(frame)).unwrap(),
            expected
        );
    }
    let failed = ControlResponse::Failed {
        epoch: Some(3),
        reason: AbortReason::StoreFull {
            detail: "writing chunks/ab".into(),
        },
    };
    let old = encode_frame_as(&failed, 4).unwrap();
    match read_message::<ControlResponse>(&mut Cursor::new(old)).unwrap() {
        ControlResponse::Failed {
            reason: AbortReason::Text(text),
            ..
        } => assert!(text.starts_with("the store is full"), "{text}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn versions_are_negotiated_down_never_up() {
    assert_eq!(negotiated(4), 4);
    assert_eq!(negotiated(PROTOCOL_VERSION), PROTOCOL_VERSION);
    assert_eq!(negotiated(PROTOCOL_VERSION + 3), PROTOCOL_VERSION);
}

#[test]
fn a_final_checkpoint_reaches_an_older_agent_as_a_plain_one() {
    let last = CoordinatorToAgent::FinalCheckpoint {
        epoch: 9,
        park_timeout_ms: 60_000,
    };
    let plain = CoordinatorToAgent::Checkpoint {
        epoch: 9,
        park_timeout_ms: 60_000,
    };
    for version in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
        let payload = last.encode_for(version).unwrap();
        let read = CoordinatorToAgent::decode_from(version, &payload).unwrap();
        let expected = if version >= FINAL_CHECKPOINT_VERSION {
            &last
        } else {
            &plain
        };
        assert_eq!(&read, expected, "version {version}");
    }
    // A version 4 agent reads its own layout's Checkpoint.
    let frame = encode_frame_as(&last, 4).unwrap();
    let old: v4::CoordinatorToAgent =
        crate::format::codec::decode(&frame[FRAME_HEADER_LEN..]).unwrap();
    assert!(
        matches!(
            old,
            v4::CoordinatorToAgent::Checkpoint {
                epoch: 9,
                park_timeout_ms: 60_000
            }
        ),
        "{old:?}"
    );
}

#[test]
fn a_rank_held_at_its_safe_point_is_told_apart_on_the_wire() {
    let reason = AbortReason::WaitedForOthers {
        rank: 2,
        waited_ms: 3000,
    }
    .on_node("a");
    let failed = AgentToCoordinator::Failed {
        epoch: 5,
        reason: reason.clone(),
    };
    let mut buf = Vec::new();
    write_message(&mut buf, &failed).unwrap();
    assert_eq!(
        read_message::<AgentToCoordinator>(&mut Cursor::new(buf)).unwrap(),
        failed
    );
    let text = reason.to_string();
    assert!(
        text.starts_with("node a: rank 2 waited 3000 ms at a safe point for the other ranks")
            && text.contains("cryo_checkpoint_point"),
        "{text}"
    );
}

#[test]
fn a_version_9_peer_reads_a_rank_held_at_its_safe_point_as_a_park_timeout() {
    let held = AbortReason::WaitedForOthers {
        rank: 2,
        waited_ms: 3000,
    };
    let as_v9 = AbortReason::ParkTimeout {
        rank: 2,
        waited_ms: 3000,
    };
    let failed = AgentToCoordinator::Failed {
        epoch: 5,
        reason: held.clone().on_node("a"),
    };
    let frame = encode_frame_as(&failed, 9).unwrap();
    let header = FrameHeader::decode(frame[..FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
    assert_eq!(header.version, 9);
    // A version 9 peer decodes the payload as this build's layout: the
    // variant it knows, wrappers kept.
    let read: AgentToCoordinator =
        crate::format::codec::decode(&frame[FRAME_HEADER_LEN..]).unwrap();
    assert_eq!(
        read,
        AgentToCoordinator::Failed {
            epoch: 5,
            reason: as_v9.clone().on_node("a"),
        }
    );
    fn payload_as_v9<M: Message>(msg: &M) -> Vec<u8> {
        encode_frame_as(msg, 9).unwrap()[FRAME_HEADER_LEN..].to_vec()
    }
    let decode = crate::format::codec::decode::<CoordinatorToAgent>;
    let abort = CoordinatorToAgent::Abort {
        epoch: 5,
        reason: AbortReason::Coordinator(Box::new(held.clone())),
    };
    assert_eq!(
        decode(&payload_as_v9(&abort)).unwrap(),
        CoordinatorToAgent::Abort {
            epoch: 5,
            reason: AbortReason::Coordinator(Box::new(as_v9.clone())),
        }
    );
    let control = ControlResponse::Failed {
        epoch: Some(5),
        reason: held.clone(),
    };
    assert_eq!(
        crate::format::codec::decode::<ControlResponse>(&payload_as_v9(&control)).unwrap(),
        ControlResponse::Failed {
            epoch: Some(5),
            reason: as_v9.clone(),
        }
    );
    let job = JobResponse::Aborted {
        epoch: 5,
        reason: held.clone(),
    };
    assert_eq!(
        crate::format::codec::decode::<JobResponse>(&payload_as_v9(&job)).unwrap(),
        JobResponse::Aborted {
            epoch: 5,
            reason: as_v9,
        }
    );
    // This version keeps it.
    let frame = encode_frame(&failed).unwrap();
    assert_eq!(
        read_message::<AgentToCoordinator>(&mut Cursor::new(frame)).unwrap(),
        failed
    );
}

/// How a rank left, as a peer of `version` reads it once encoded.
fn departure_at(version: u16, how: Departure) -> Departure {
    let frame = encode_frame_as(&AgentToCoordinator::RankLeft { rank: 2, how }, version).unwrap();
    match read_message::<AgentToCoordinator>(&mut Cursor::new(frame)).unwrap() {
        AgentToCoordinator::RankLeft { rank: 2, how } => how,
        other => panic!("{other:?}"),
    }
}

#[test]
fn how_a_rank_left_is_typed_from_version_14_and_text_before() {
    let restore = Departure::RestoreFailed {
        epoch: 3,
        error: "no such file".into(),
    };
    assert_eq!(departure_at(PROTOCOL_VERSION, restore.clone()), restore);
    assert_eq!(
        departure_at(14, Departure::Exited { status: 7 }),
        Departure::Exited { status: 7 }
    );
    for version in [4, 5, 13] {
        // A goodbye and a silent end keep their meaning across the text.
        assert_eq!(
            departure_at(version, Departure::Finalized),
            Departure::Finalized
        );
        assert_eq!(
            departure_at(version, Departure::Vanished),
            Departure::Vanished
        );
        // Anything else is the older agent's account, for people.
        assert_eq!(
            departure_at(version, restore.clone()),
            Departure::Told {
                account: restore.to_string()
            }
        );
    }
    // What a version 13 coordinator reads: the text it compared.
    let frame = encode_frame_as(
        &AgentToCoordinator::RankLeft {
            rank: 1,
            how: Departure::Finalized,
        },
        13,
    )
    .unwrap();
    let old: v13::AgentToCoordinator =
        crate::format::codec::decode(&frame[FRAME_HEADER_LEN..]).unwrap();
    assert!(
        matches!(&old, v13::AgentToCoordinator::RankLeft { rank: 1, why } if why == "finalized"),
        "{old:?}"
    );
}

#[test]
fn a_newer_client_is_answered_in_this_version_and_speaks_it_from_then_on() {
    let token = crate::token::JobToken::generate().unwrap();
    let (client, server) = UnixStream::pair().unwrap();
    let newer = Hello {
        version: PROTOCOL_VERSION + 1,
        ..hello()
    };
    let server_token = token.clone();
    let server = std::thread::spawn(move || {
        let greeting =
            crate::auth::accept(&server, |s| Ok((read_message::<Hello>(&mut &*s)?, ()))).unwrap();
        greeting.hello.check_version().unwrap();
        crate::auth::verify(
            &server_token,
            &greeting.nonce,
            &greeting.hello,
            &greeting.proof,
        )
        .unwrap();
        let welcome = ControlResponse::Welcome {
            node: "a".into(),
            job: "heat".into(),
        };
        write_message_as(&mut &server, &welcome, greeting.hello.version).unwrap();
        read_frame(&mut &server).unwrap().header.version
    });
    // The client writes its hello in its own, newer, version.
    let payload = crate::format::codec::encode(&newer).unwrap();
    let mut frame = header_bytes(
        PROTOCOL_VERSION + 1,
        Command::Hello as u16,
        0,
        payload.len() as u32,
    );
    frame.extend_from_slice(&payload);
    std::io::Write::write_all(&mut &client, &frame).unwrap();
    let spoken = crate::auth::answer(&mut &client, &newer, Some(&token)).unwrap();
    assert_eq!(
        spoken, PROTOCOL_VERSION,
        "the server answers in its own version"
    );
    let welcome = read_frame(&mut &client).unwrap();
    assert_eq!(welcome.header.version, PROTOCOL_VERSION);
    write_message_as(&mut &client, &ControlRequest::Status, spoken).unwrap();
    assert_eq!(server.join().unwrap(), PROTOCOL_VERSION);
}

#[test]
fn a_heartbeat_goes_only_to_a_coordinator_that_takes_it() {
    let alive = AgentToCoordinator::Alive;
    for version in HEARTBEAT_VERSION..=PROTOCOL_VERSION {
        let payload = alive.encode_for(version).unwrap();
        assert_eq!(
            AgentToCoordinator::decode_from(version, &payload).unwrap(),
            alive,
            "version {version}"
        );
    }
    for version in MIN_PROTOCOL_VERSION..HEARTBEAT_VERSION {
        let err = alive.encode_for(version).unwrap_err();
        assert!(
            err.to_string().contains("heartbeat"),
            "version {version}: {err}"
        );
    }
    // The other reports still reach every version.
    let durable = AgentToCoordinator::Durable {
        epoch: 3,
        rank: 1,
        written: 10,
    };
    for version in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
        let payload = durable.encode_for(version).unwrap();
        assert_eq!(
            AgentToCoordinator::decode_from(version, &payload).unwrap(),
            durable,
            "version {version}"
        );
    }
}
