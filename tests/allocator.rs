//! The CPU allocator settings of `rsitrd::model::device` (glibc only), in a process of their
//! own: resident memory is counted for the whole process.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use rsitrd::model::device::{release_free_memory, tune_cpu_allocator};

/// Resident pages of this process (`/proc/self/statm`), in MiB.
fn resident_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages as f64 * 4096.0 / (1 << 20) as f64
}

/// What a training run leaves behind, freed but below a live allocation (so no trim
/// threshold reaches it), goes back to the kernel once the run is over.
#[test]
fn memory_freed_after_a_run_is_released() {
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
