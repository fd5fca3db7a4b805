//! Protocol version 4's layouts of the messages that version 5 changed.
//!
//! Version 5 made every epoch failure a typed [`AbortReason`]; version 4
//! carried text. The variants keep their order, so each layout here differs
//! from today's only in those fields. A version 5 server reads a version 4
//! client's frames through these types (text becomes
//! [`AbortReason::Text`]) and answers it in them (a reason becomes its
//! `Display` text).
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{AbortReason, MIN_PROTOCOL_VERSION};
use super::{AgentStatus, CheckpointReport, JobStatus};
use crate::format::codec::{self, CodecError};

/// The first version with typed reasons.
const TYPED_REASONS: u16 = 5;

/// Encodes `msg` in the layout a peer of `version` reads.
pub(super) fn encode_as<Old, New>(msg: &New, version: u16) -> Result<Vec<u8>, CodecError>
where
    Old: Serialize + for<'a> From<&'a New>,
    New: Serialize,
{
    if version < TYPED_REASONS {
        debug_assert!(version >= MIN_PROTOCOL_VERSION);
        codec::encode(&Old::from(msg))
    } else {
        codec::encode(msg)
    }
}

/// Decodes a payload a peer of `version` wrote.
pub(super) fn decode_as<Old, New>(version: u16, payload: &[u8]) -> Result<New, CodecError>
where
    Old: DeserializeOwned + Into<New>,
    New: DeserializeOwned,
{
    if version < TYPED_REASONS {
        codec::decode::<Old>(payload).map(Into::into)
    } else {
        codec::decode(payload)
    }
}

/// `From` both ways between this build's enum (or, `in` a module, a later
/// version's layout of it) and version 4's layout:
/// the variants in `same` carry the same fields in both; those in `reasons`
/// also carry a `reason`, an [`AbortReason`] now and text in version 4;
/// those in `newer` came later and are written as the version 4 variant
/// with the same fields; those in `departures` carry a `how`, a
/// [`super::Departure`] now and `why`, text, in the older layout.
macro_rules! layouts {
    (
        $enum:ident $( in $layout:ident )?;
        same: [ $( $sv:ident $( { $($sf:ident),* } )? $( ( $st:ident ) )? ),* $(,)? ];
        reasons: [ $( $rv:ident { $($rf:ident),* } ),* $(,)? ]
        $( ; newer: [ $( $nv:ident { $($nf:ident),* } => $ov:ident ),* $(,)? ] )?
        $( ; departures: [ $( $dv:ident { $($df:ident),* } ),* $(,)? ] )?
    ) => {
        impl From<&super::$($layout::)?$enum> for $enum {
            fn from(msg: &super::$($layout::)?$enum) -> Self {
                type New = super::$($layout::)?$enum;
                match msg.clone() {
                    $( New::$sv $( { $($sf),* } )? $( ( $st ) )?
                        => Self::$sv $( { $($sf),* } )? $( ( $st ) )?, )*
                    $( New::$rv { $($rf,)* reason }
                        => Self::$rv { $($rf,)* reason: reason.to_string() }, )*
                    $( $( New::$nv { $($nf),* } => Self::$ov { $($nf),* }, )* )?
                    $( $( New::$dv { $($df,)* how }
                        => Self::$dv { $($df,)* why: how.to_legacy_text() }, )* )?
                }
            }
        }

        impl From<$enum> for super::$($layout::)?$enum {
            fn from(msg: $enum) -> Self {
                match msg {
                    $( $enum::$sv $( { $($sf),* } )? $( ( $st ) )?
                        => Self::$sv $( { $($sf),* } )? $( ( $st ) )?, )*
                    $( $enum::$rv { $($rf,)* reason }
                        => Self::$rv { $($rf,)* reason: AbortReason::Text(reason) }, )*
                    $( $( $enum::$dv { $($df,)* why }
                        => Self::$dv { $($df,)* how: Departure::from_legacy_text(why) }, )* )?
                }
            }
        }
    };
}
pub(super) use layouts;

/// `CoordinatorToAgent`, version 4.
#[allow(missing_docs)]
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum CoordinatorToAgent {
    Welcome { job: String, world_size: u32 },
    Refused { reason: String },
    Checkpoint { epoch: u64, park_timeout_ms: u64 },
    Abort { epoch: u64, reason: String },
    Committed { epoch: u64 },
    ArmRestart { epoch: u64 },
    Shutdown,
}

layouts!(CoordinatorToAgent;
    same: [
        Welcome { job, world_size },
        Refused { reason },
        Checkpoint { epoch, park_timeout_ms },
        Committed { epoch },
        ArmRestart { epoch },
        Shutdown,
    ];
    reasons: [Abort { epoch }];
    newer: [FinalCheckpoint { epoch, park_timeout_ms } => Checkpoint]);

/// `AgentToCoordinator`, version 4, read and written through version 13's
/// layout (`v13.rs`).
#[allow(missing_docs)]
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum AgentToCoordinator {
    RankRegistered {
        rank: u32,
        pid: u32,
        restored_epoch: Option<u64>,
    },
    RankLeft {
        rank: u32,
        why: String,
    },
    Copied {
        epoch: u64,
        rank: u32,
        bytes: u64,
        pause_us: u64,
    },
    Durable {
        epoch: u64,
        rank: u32,
        written: u64,
    },
    Failed {
        epoch: u64,
        reason: String,
    },
    /// Never sent to a version 4 peer (see `v13.rs`).
    Alive,
}

layouts!(AgentToCoordinator in v13;
    same: [
        RankRegistered { rank, pid, restored_epoch },
        RankLeft { rank, why },
        Copied { epoch, rank, bytes, pause_us },
        Durable { epoch, rank, written },
        Alive,
    ];
    reasons: [Failed { epoch }]);

/// `JobResponse`, version 4.
#[allow(missing_docs)]
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum JobResponse {
    Refused {
        reason: String,
    },
    Committed {
        epoch: u64,
        max_pause_us: u64,
        quiesce_us: u64,
        bytes: u64,
        written: u64,
        elapsed_ms: u64,
    },
    Aborted {
        epoch: u64,
        reason: String,
    },
    Status(JobStatus),
}

layouts!(JobResponse;
    same: [
        Refused { reason },
        Committed { epoch, max_pause_us, quiesce_us, bytes, written, elapsed_ms },
        Status(status),
    ];
    reasons: [Aborted { epoch }]);

/// `ControlResponse`, version 4.
#[allow(missing_docs)]
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum ControlResponse {
    Welcome { node: String, job: String },
    Refused { reason: String },
    Checkpoint(CheckpointReport),
    Busy { epoch: u64, reason: String },
    Failed { epoch: Option<u64>, reason: String },
    RestartArmed { epoch: u64, ranks: u32 },
    Status(AgentStatus),
}

layouts!(ControlResponse;
    same: [
        Welcome { node, job },
        Refused { reason },
        Checkpoint(report),
        Busy { epoch, reason },
        RestartArmed { epoch, ranks },
        Status(status),
    ];
    reasons: [Failed { epoch }]);
