//! The systemd unit's contract with the hardening it asks for: under `ProtectSystem=strict`
//! only `ReadWritePaths` can be written, so every directory that rsitrd or a library it runs
//! writes to must lie under one of them, or the service fails (or, for caches, silently
//! redoes minutes of work) only once deployed.

mod common;

#[test]
fn every_directory_the_service_writes_is_writable_under_its_hardening() {
    let unit = std::fs::read_to_string(common::repo_root().join("systemd/rsitrd.service")).unwrap();
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(values("ProtectSystem"), ["strict"]);
    let writable: Vec<String> = values("ReadWritePaths")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    let is_writable = |dir: &str| {
        writable
            .iter()
            .any(|w| std::path::Path::new(dir).starts_with(w))
    };
    let environment: std::collections::BTreeMap<String, String> = values("Environment")
        .iter()
        .filter_map(|v| v.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // The store and inbox (rsitrd), the hub downloads (rsitrd), cubecl's autotune cache.
    for key in [
        "RSITRD__STORE__DIR",
        "RSITRD__INBOX__DIR",
        "RSITRD_CACHE_DIR",
        "XDG_CACHE_HOME",
    ] {
        let dir = environment
            .get(key)
            .unwrap_or_else(|| panic!("the unit sets no {key}"));
        assert!(
            is_writable(dir),
            "{key}={dir} is outside ReadWritePaths {writable:?}"
        );
    }
    let workdir = values("WorkingDirectory");
    assert!(
        workdir.iter().all(|d| is_writable(d)),
        "WorkingDirectory {workdir:?} outside {writable:?}"
    );
}
