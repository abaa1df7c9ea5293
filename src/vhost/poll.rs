//! How long a queue thread busy-polls before it sleeps.
//!
//! Sleeping is not free: the next kick has to wake the thread through
//! epoll, and on a virtual machine whose idle vCPUs halt that costs tens of
//! microseconds of wall time and of CPU time. Polling the ring for a while
//! after the last piece of work avoids the wake-up when the next request
//! comes soon, and wastes the CPU when it does not.
//!
//! - [`Polling::Fixed`] (`poll-us=N`): always poll `N` µs after the last
//!   activity.
//! - [`Polling::Adaptive`] (`poll-max-ns`, `poll-grow`, `poll-shrink`, the
//!   names and meanings of QEMU's iothread options): the window follows how
//!   long the thread was idle before each wake-up. An idle period that ended
//!   within `poll-max-ns`, but after the window, means polling a little
//!   longer would have caught it: the window grows (from 4 µs, times
//!   `poll-grow`, at most `poll-max-ns`). An idle period longer than
//!   `poll-max-ns` means polling would not have caught it at any allowed
//!   length: the window shrinks (divided by `poll-shrink`, or back to 0).
//!   One that ended within the window needs no change. A queue that sees
//!   requests seldom therefore never polls, and one whose requests come back
//!   quickly polls just long enough to catch them.

use std::time::Duration;

/// Where an adaptive window starts when it first grows, in nanoseconds.
pub const INITIAL_NS: u64 = 4_000;
/// `poll-grow` / `poll-shrink` 0: the default factor (grow) or reset (shrink).
const DEFAULT_GROW: u64 = 2;

/// A queue thread's polling policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polling {
    /// Sleep as soon as there is nothing to do.
    Off,
    /// Poll this long after the last activity.
    Fixed(Duration),
    /// A window that adapts between 0 and `max_ns`.
    Adaptive(Adaptive),
}

impl Polling {
    /// The policy for an export's options: `poll-us` when set, else the
    /// adaptive window when `poll-max-ns` is not 0.
    pub fn new(poll_us: u64, max_ns: u64, grow: u64, shrink: u64) -> Self {
        if poll_us > 0 {
            Polling::Fixed(Duration::from_micros(poll_us))
        } else if max_ns > 0 {
            Polling::Adaptive(Adaptive::new(max_ns, grow, shrink))
        } else {
            Polling::Off
        }
    }

    /// How long to poll after the last activity now.
    pub fn window(&self) -> Duration {
        match self {
            Polling::Off => Duration::ZERO,
            Polling::Fixed(d) => *d,
            Polling::Adaptive(a) => Duration::from_nanos(a.cur_ns),
        }
    }

    /// Tells an adaptive policy how long the thread was idle (polling and
    /// then sleeping) before the event that woke it.
    pub fn woke_after(&mut self, idle: Duration) {
        if let Polling::Adaptive(a) = self {
            a.woke_after(u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX));
        }
    }
}

/// QEMU-style adaptive polling state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adaptive {
    max_ns: u64,
    grow: u64,
    shrink: u64,
    cur_ns: u64,
}

impl Adaptive {
    /// A window of 0 that may grow to `max_ns`.
    pub fn new(max_ns: u64, grow: u64, shrink: u64) -> Self {
        Adaptive { max_ns, grow, shrink, cur_ns: 0 }
    }

    /// The current window, in nanoseconds.
    pub fn window_ns(&self) -> u64 {
        self.cur_ns
    }

    fn woke_after(&mut self, idle_ns: u64) {
        if idle_ns <= self.cur_ns {
            // Caught while polling (or just after): the window is right.
        } else if idle_ns > self.max_ns {
            self.cur_ns = match self.shrink {
                0 => 0,
                s => {
                    let n = self.cur_ns / s;
                    if n < INITIAL_NS {
                        0
                    } else {
                        n
                    }
                }
            };
        } else if self.cur_ns < self.max_ns {
            let grow = if self.grow == 0 { DEFAULT_GROW } else { self.grow };
            let n = if self.cur_ns == 0 { INITIAL_NS } else { self.cur_ns.saturating_mul(grow) };
            self.cur_ns = n.min(self.max_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn options_pick_the_policy() {
        assert_eq!(Polling::new(0, 0, 0, 0), Polling::Off);
        assert_eq!(Polling::new(50, 32_768, 0, 0), Polling::Fixed(us(50)), "poll-us wins");
        assert!(matches!(Polling::new(0, 32_768, 0, 0), Polling::Adaptive(_)));
        assert_eq!(Polling::new(0, 32_768, 0, 0).window(), Duration::ZERO, "starts at 0");
        let mut fixed = Polling::new(50, 0, 0, 0);
        fixed.woke_after(us(1_000_000));
        assert_eq!(fixed.window(), us(50), "a fixed window never moves");
    }

    #[test]
    fn grows_while_polling_longer_would_have_caught_the_event() {
        let mut p = Polling::new(0, 32_768, 0, 0);
        let mut seen = Vec::new();
        for _ in 0..6 {
            p.woke_after(Duration::from_nanos(32_500));
            seen.push(p.window().as_nanos());
        }
        assert_eq!(seen, [4_000, 8_000, 16_000, 32_000, 32_768, 32_768]);
        // Now caught while polling: no change.
        p.woke_after(us(3));
        assert_eq!(p.window().as_nanos(), 32_768);
    }

    #[test]
    fn an_idle_period_beyond_the_maximum_shrinks_it() {
        let mut p = Polling::new(0, 32_768, 0, 0);
        for _ in 0..5 {
            p.woke_after(us(20));
        }
        p.woke_after(us(40));
        assert_eq!(p.window(), Duration::ZERO, "poll-shrink 0 resets");

        let mut p = Polling::new(0, 64_000, 4, 4);
        p.woke_after(us(60));
        p.woke_after(us(60));
        assert_eq!(p.window().as_nanos(), 16_000, "4 µs × 4");
        p.woke_after(us(60));
        assert_eq!(p.window().as_nanos(), 64_000, "× 4, capped");
        p.woke_after(us(60));
        assert_eq!(p.window().as_nanos(), 64_000, "caught while polling: no change");
        p.woke_after(us(100));
        assert_eq!(p.window().as_nanos(), 16_000, "divided by poll-shrink");
        p.woke_after(us(100));
        assert_eq!(p.window().as_nanos(), 4_000);
        p.woke_after(us(100));
        assert_eq!(p.window(), Duration::ZERO, "below 4 µs is 0");
    }

    #[test]
    fn seldom_requests_never_start_polling() {
        let mut p = Polling::new(0, 32_768, 0, 0);
        for _ in 0..100 {
            p.woke_after(us(5_000));
        }
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn huge_factors_saturate_at_the_maximum() {
        let mut p = Polling::new(0, u64::MAX / 2, u64::MAX, 0);
        p.woke_after(us(1));
        p.woke_after(us(5));
        assert_eq!(p.window().as_nanos(), u128::from(u64::MAX / 2));
    }
}
