//! Hypervisor steal: the share of this machine's CPU time that the host gave to other work
//! while our virtual CPUs were ready to run (Linux's `/proc/stat`, column `steal`). On a
//! shared cloud machine it is what makes one timed run 2x another with nothing changed, so
//! `bench` reports it beside its timings.

/// Cumulative CPU time of all CPUs, in the kernel's ticks: the total and the part stolen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuTimes {
    total: u64,
    steal: u64,
}

impl CpuTimes {
    /// Now, where the system says (Linux); `None` elsewhere.
    pub fn now() -> Option<CpuTimes> {
        parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The fraction of CPU time from `self` to `later` that was stolen (0 when no time passed).
    pub fn steal_since(self, later: CpuTimes) -> f64 {
        let total = later.total.saturating_sub(self.total);
        if total == 0 { 0.0 } else { later.steal.saturating_sub(self.steal) as f64 / total as f64 }
    }
}

/// The all-CPU line of a `/proc/stat`: `cpu  user nice system idle iowait irq softirq steal
/// [guest guest_nice]`. Guest time is already counted in user and nice, so it is left out of
/// the total.
fn parse(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let steal = *fields.get(7)?;
    Some(CpuTimes { total: fields.iter().sum(), steal })
}

/// `f()` and the steal over the time it took (`None` where the system does not say).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Option<f64>) {
    let before = CpuTimes::now();
    let r = f();
    (r, before.zip(CpuTimes::now()).map(|(b, a)| b.steal_since(a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_steal_column_of_the_all_cpu_line() {
        let before = "cpu  100 0 20 800 5 0 1 10 0 0\ncpu0 50 0 10 400 2 0 0 5 0 0\nintr 1 2 3\n";
        let after = "cpu  160 0 30 900 5 0 1 40 7 0\ncpu0 80 0 15 450 2 0 0 20 0 0\n";
        let (b, a) = (parse(before).unwrap(), parse(after).unwrap());
        assert_eq!(b, CpuTimes { total: 936, steal: 10 });
        // 30 of the 200 ticks between them were stolen; guest time (7) is inside user time.
        assert!((b.steal_since(a) - 0.15).abs() < 1e-12);
        assert_eq!(b.steal_since(b), 0.0);
    }

    #[test]
    fn kernels_without_a_steal_column_or_an_all_cpu_line_say_nothing() {
        assert_eq!(parse("cpu  100 0 20 800 5 0 1\n"), None);
        assert_eq!(parse("cpu0 100 0 20 800 5 0 1 10\n"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn measures_this_machine_where_it_can() {
        let (v, steal) = measure(|| (0..1_000_000u64).sum::<u64>());
        assert_eq!(v, 499_999_500_000);
        if std::fs::read_to_string("/proc/stat").is_ok() {
            let s = steal.expect("a /proc/stat has a steal column (Linux 2.6.11 on)");
            assert!((0.0..=1.0).contains(&s), "{s}");
        }
    }
}
