//! The CPU allocator settings of `rsitrd::model::device` (glibc only), in a process of their
//! own: no other test has moved glibc's adaptive limits first, and resident memory is
//! counted for the whole process.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::sync::Mutex;

use rsitrd::model::device::{release_free_memory, tune_cpu_allocator};

/// One test at a time: the resident size one counts would include the other's buffers.
static SERIAL: Mutex<()> = Mutex::new(());

fn page_bytes() -> usize {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Resident pages of this process (`/proc/self/statm`), in MiB.
fn resident_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    (pages as usize * page_bytes()) as f64 / (1 << 20) as f64
}

/// Page faults of this thread so far (minor: pages mapped in and zero-filled).
fn thread_page_faults() -> i64 {
    // SAFETY: getrusage writes only the struct it is given.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
        usage.ru_minflt
    }
}

/// An activation-sized buffer freed and allocated again is the same memory, with no page
/// faulted in afresh.
#[test]
fn freed_activations_are_reused_without_page_faults() {
    /// Allocates `size` bytes, writes every byte, frees them; the page faults it took.
    fn touch(size: usize) -> i64 {
        let before = thread_page_faults();
        let buffer = vec![1u8; size];
        std::hint::black_box(&buffer);
        drop(buffer);
        thread_page_faults() - before
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tune_cpu_allocator();
    for size in [4 << 20, 20 << 20] {
        let pages = (size / page_bytes()) as i64;
        let first = touch(size);
        let again = touch(size);
        assert!(
            again < pages / 10,
            "{size} bytes again: {again} page faults (first time {first}, {pages} pages)"
        );
    }
}

/// What a training run leaves behind, freed but below a live allocation (so no trim
/// threshold reaches it), goes back to the kernel once the run is over.
#[test]
fn memory_freed_after_a_run_is_released() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tune_cpu_allocator();
    // 48 activations of 1 MiB, written, then one that stays alive above them.
    let freed: Vec<Vec<u8>> = (0..48).map(|_| vec![1u8; 1 << 20]).collect();
    let live = vec![1u8; 1 << 20];
    drop(freed);
    let before = resident_mib();
    release_free_memory();
    let after = resident_mib();
    std::hint::black_box(&live);
    assert!(
        before - after > 32.0,
        "resident {before:.1} MiB before the release, {after:.1} MiB after"
    );
}
