//! When the region reservation's address range is taken, `init` says by
//! what, and changes nothing.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroUsize;

use cryo_rank::{Config, InitError};
use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};

#[test]
fn taken_reservation_names_the_occupant() {
    let base = 0x5c00_0000_0000u64;
    // SAFETY: a fresh mapping at an address nothing else in this test
    // process uses; MAP_FIXED_NOREPLACE refuses to replace anything.
    unsafe {
        mmap_anonymous(
            NonZeroUsize::new(usize::try_from(base + (1 << 20)).unwrap()),
            NonZeroUsize::new(4096).unwrap(),
            ProtFlags::PROT_READ,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED_NOREPLACE,
        )
    }
    .unwrap();
    let err = cryo_rank::init_with(Config::alone(base, 1 << 30)).unwrap_err();
    assert!(matches!(err, InitError::Reserve { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("5c0000100000") && text.contains("CRYO_REGION_BASE"),
        "{text}"
    );
    // Nothing was set up: a second try elsewhere works, alone (no agent).
    let info = cryo_rank::init_with(Config::alone(base + (2 << 30), 1 << 30)).unwrap();
    assert_eq!(info.node, None);
    let region = cryo_rank::region("x", 100, cryo_rank::Backing::Anonymous).unwrap();
    assert_eq!(region.as_ptr() as u64, base + (2 << 30));
    assert_eq!(
        cryo_rank::checkpoint_point().unwrap(),
        cryo_rank::SafePoint::Continue
    );
}
