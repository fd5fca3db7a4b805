//! The read buffers a restore leaves on its threads (a span of a pack, a
//! chunk file) are freed on the threads that hold them: a restarted rank
//! frees them inside its restore pool, where they are, once its state is
//! back, so that the memory goes back to the application.
#![allow(clippy::unwrap_used)]

use cryo_core::store::reader::{held_read_buffer_bytes, release_read_buffers};

mod common;
use common::{restore, setup, state, write_epoch};

fn held_by(pool: &rayon::ThreadPool) -> usize {
    pool.broadcast(|_| held_read_buffer_bytes()).iter().sum()
}

#[test]
fn a_restore_frees_its_read_buffers_only_on_the_pool_it_ran_on() {
    let (_dir, _store, job) = setup();
    let data = state(4 << 20, 7);
    let manifest = write_epoch(&job, 1, &[vec![("grid", data.clone())]]);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();

    assert_eq!(pool.install(|| restore(&job, &manifest, 0, 0)), data);
    assert!(held_by(&pool) > 0, "the restore used no read buffer");
    // Freed from outside the pool (rayon's global pool): the restore
    // pool's threads keep theirs.
    release_read_buffers();
    assert!(held_by(&pool) > 0);

    pool.install(release_read_buffers);
    assert_eq!(held_by(&pool), 0);
    // The buffers are taken again by the next restore.
    assert_eq!(pool.install(|| restore(&job, &manifest, 0, 0)), data);
    assert!(held_by(&pool) > 0);
}
