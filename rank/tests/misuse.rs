//! Regions and buffers that cannot be saved and given back are refused by
//! name when they are registered, not saved at every checkpoint and then
//! crashed on at the restart.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroUsize;

use cryo_rank::{Config, RegionError};
use nix::sys::mman::{mmap_anonymous, mprotect, MapFlags, ProtFlags};

static TABLE: [u8; 8192] = [7; 8192];

#[test]
fn read_only_buffers_and_impossible_sizes_are_refused_by_name() {
    cryo_rank::init_with(Config::alone(0x5d00_0000_0000, 1 << 30)).unwrap();

    // A size near 2^64 (a negative size cast to size_t) does not fit; it
    // is not "zero length".
    for len in [usize::MAX, usize::MAX - 100] {
        let err = cryo_rank::region("huge", len, cryo_rank::Backing::Anonymous).unwrap_err();
        assert!(matches!(err, RegionError::ReservationFull { .. }), "{err}");
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    // An empty region (a rank whose share is empty) is registered with
    // nothing to save: its pointer is aligned and not NULL, and its name
    // is taken.
    let empty = cryo_rank::region("empty", 0, cryo_rank::Backing::Anonymous).unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.as_ptr() as usize % 4096, 0);
    assert_ne!(empty.as_ptr() as usize, 0);
    let again = cryo_rank::region("empty", 0, cryo_rank::Backing::Anonymous).unwrap_err();
    assert!(again.to_string().contains("\"empty\""), "{again}");

    // A constant table lives in read-only memory.
    // SAFETY: the runtime only reads the bytes before it refuses them.
    let err =
        unsafe { cryo_rank::protect("table", TABLE.as_ptr().cast_mut(), TABLE.len()) }.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("region \"table\"") && text.contains("not all writable memory"),
        "{text}"
    );

    // A buffer the program made read-only; once writable again, the same
    // name is taken (the refusal registered nothing).
    let len = 4 << 20;
    // SAFETY: a fresh anonymous mapping nothing else uses, with a guard
    // page after the buffer.
    let buffer = unsafe {
        mmap_anonymous(
            None,
            NonZeroUsize::new(len + 4096).unwrap(),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE,
        )
    }
    .unwrap();
    let ptr = buffer.as_ptr().cast::<u8>();
    // SAFETY: the guard page of the mapping made above.
    let guard = unsafe { std::ptr::NonNull::new_unchecked(ptr.add(len)) };
    // SAFETY: as above.
    unsafe { mprotect(guard.cast(), 4096, ProtFlags::PROT_NONE) }.unwrap();
    // SAFETY: the buffer's part of the mapping made above.
    unsafe { mprotect(buffer, len, ProtFlags::PROT_READ) }.unwrap();
    // SAFETY: valid for `len` bytes for the life of the test.
    let err = unsafe { cryo_rank::protect("buf", ptr, len) }.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("region \"buf\"") && text.contains("r--p"),
        "{text}"
    );
    // SAFETY: as above.
    unsafe { mprotect(buffer, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE) }.unwrap();
    // SAFETY: as above.
    unsafe { cryo_rank::protect("buf", ptr, len) }.unwrap();
    // Running into the guard page is refused too.
    // SAFETY: nothing is read: it is refused first.
    let err = unsafe { cryo_rank::protect("past", ptr, len + 4096) }.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("not all writable memory") && text.contains("---p"),
        "{text}"
    );
}
