//! Wire frames: the fixed header checks, the payload length cap, and every
//! message type's decoder, on arbitrary bytes and on arbitrary payloads
//! behind a valid header (so the fuzzer reaches the codec).
#![no_main]

use std::io::Cursor;

use cryo_core::protocol::{
    read_frame, AgentToCoordinator, AgentToRank, Challenge, Command, ControlRequest,
    ControlResponse, CoordinatorToAgent, Frame, FrameHeader, Hello, JobRequest, JobResponse,
    Proof, RankToAgent, PROTOCOL_VERSION,
};
use libfuzzer_sys::fuzz_target;

fn decode_all(frame: &Frame) {
    let _ = frame.decode::<Hello>();
    let _ = frame.decode::<Challenge>();
    let _ = frame.decode::<Proof>();
    let _ = frame.decode::<RankToAgent>();
    let _ = frame.decode::<AgentToRank>();
    let _ = frame.decode::<ControlRequest>();
    let _ = frame.decode::<ControlResponse>();
    let _ = frame.decode::<CoordinatorToAgent>();
    let _ = frame.decode::<AgentToCoordinator>();
    let _ = frame.decode::<JobRequest>();
    let _ = frame.decode::<JobResponse>();
}

fuzz_target!(|data: &[u8]| {
    // A stream of frames as a peer could send them.
    let mut stream = Cursor::new(data);
    while let Ok(frame) = read_frame(&mut stream) {
        decode_all(&frame);
    }
    // The first byte picks a command; the rest is the payload.
    if let Some((&pick, payload)) = data.split_first() {
        let command = match Command::from_u16(u16::from(pick % 11) + 1) {
            Ok(command) => command,
            Err(_) => return,
        };
        let frame = Frame {
            header: FrameHeader {
                version: PROTOCOL_VERSION,
                command,
                flags: 0,
                len: payload.len() as u32,
            },
            payload: payload.to_vec(),
        };
        decode_all(&frame);
    }
});
