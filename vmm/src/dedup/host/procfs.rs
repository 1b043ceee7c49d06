//! What the host says about its KSM outside sysfs: this process's
//! /proc/self/ksm_stat and ksmd's CPU time.

/// /proc/self/ksm_stat as (name, value) pairs (signed values clamped at 0).
pub(super) fn ksm_stat() -> Vec<(String, u64)> {
    let text = std::fs::read_to_string("/proc/self/ksm_stat").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            let v = v.trim();
            let n = v.parse::<u64>().ok().or_else(|| v.parse::<i64>().ok().map(|x| x.max(0) as u64))?;
            Some((k.to_string(), n))
        })
        .collect()
}

/// A line of /proc/self/ksm_stat with its sign (`ksm_process_profit` is
/// negative while this process's rmap items cost more than it saves).
pub(super) fn ksm_stat_signed(name: &str) -> Option<i64> {
    let text = std::fs::read_to_string("/proc/self/ksm_stat").ok()?;
    text.lines().filter_map(|l| l.split_once(' ')).find(|(k, _)| *k == name)?.1.trim().parse().ok()
}

fn stat_value(name: &str) -> u64 {
    ksm_stat().into_iter().find(|(k, _)| k == name).map_or(0, |(_, v)| v)
}

pub(super) fn merging_pages() -> u64 {
    stat_value("ksm_merging_pages")
}

pub(super) fn rmap_items() -> u64 {
    stat_value("ksm_rmap_items")
}

/// The pid of the kernel thread ksmd (a child of kthreadd, pid 2: any user
/// can name a process "ksmd").
pub(super) fn find_ksmd() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // Field 4 of stat, after the parenthesised comm, is the parent pid.
        let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
        (comm.trim() == "ksmd" && ppid == "2").then_some(pid)
    })
}

/// A thread's time on CPU in ns, the first field of /proc/PID/schedstat.
pub(super) fn ksmd_cpu_ns(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?.split_whitespace().next()?.parse().ok()
}
