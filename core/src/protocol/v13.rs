//! Protocol version 13's layout of [`super::AgentToCoordinator`], the one
//! message version 14 changed: `RankLeft` said how a rank left in text,
//! whose one fixed value ("finalized") meant a goodbye; it is now a typed
//! [`Departure`]. Versions 5 to 13 are read and written through this
//! layout; version 4's (`v4.rs`) sits on top of it.
use serde::{Deserialize, Serialize};

use super::v4::layouts;
use super::{AbortReason, Departure};

/// `AgentToCoordinator`, versions 5 to 13. The variants keep their order.
#[allow(missing_docs)]
#[derive(Debug, Clone, Serialize, Deserialize)]
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
        reason: AbortReason,
    },
    /// Version 16's heartbeat: never sent to an older peer (see
    /// `AgentToCoordinator::encode_for`), so never in an older frame;
    /// here only so that the layouts convert both ways.
    Alive,
}

layouts!(AgentToCoordinator;
    same: [
        RankRegistered { rank, pid, restored_epoch },
        Copied { epoch, rank, bytes, pause_us },
        Durable { epoch, rank, written },
        Failed { epoch, reason },
        Alive,
    ];
    reasons: [];
    newer: [];
    departures: [RankLeft { rank }]);
