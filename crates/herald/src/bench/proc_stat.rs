//! CPU time and resident memory of a process, from /proc (Linux).

use anyhow::Context;

#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcStat {
    /// User + system CPU time, µs.
    pub(crate) cpu_us: u64,
    pub(crate) rss_kb: u64,
}

impl ProcStat {
    pub(crate) fn read(pid: u32) -> anyhow::Result<Self> {
        Self::read_path(&format!("/proc/{pid}"))
    }

    pub(crate) fn read_self() -> anyhow::Result<Self> {
        Self::read_path("/proc/self")
    }

    fn read_path(dir: &str) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string(format!("{dir}/stat")).with_context(|| format!("{dir}/stat"))?;
        // Fields after the command name (which may contain spaces) in parentheses.
        let after = stat.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15 (1-based) of the whole line.
        let ticks: u64 =
            fields.get(11).context("utime")?.parse::<u64>()? + fields.get(12).context("stime")?.parse::<u64>()?;
        let status = std::fs::read_to_string(format!("{dir}/status"))?;
        let rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // Linux reports in clock ticks of 1/100 s.
        Ok(ProcStat { cpu_us: ticks * 10_000, rss_kb })
    }
}
