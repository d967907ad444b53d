//! Where start-up time goes: the steps from `main` to READY=1, timed and logged in
//! one line at READY (issue 10 asks READY <= 120 ms; this shows which step to cut).
//! Recording stops at the report, so reloads later add nothing.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

struct Steps {
    t0: Instant,
    last: Instant,
    done: Vec<(String, Duration)>,
}

static STEPS: Mutex<Option<Steps>> = Mutex::new(None);

fn with(f: impl FnOnce(&mut Option<Steps>)) {
    // A poisoned lock only loses timings.
    if let Ok(mut g) = STEPS.lock() {
        f(&mut g);
    }
}

/// Start timing (first thing in `main`).
pub fn begin() {
    let now = Instant::now();
    with(|s| *s = Some(Steps { t0: now, last: now, done: Vec::new() }));
}

/// The step that just ended took the time since the previous one.
pub fn step(name: impl Into<String>) {
    let now = Instant::now();
    with(|s| {
        if let Some(s) = s {
            s.done.push((name.into(), now - s.last));
            s.last = now;
        }
    });
}

/// Stop timing; "total X ms: step a ms, step b ms, ..." (None when not started).
pub fn report() -> Option<String> {
    let mut out = None;
    with(|s| {
        if let Some(s) = s.take() {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let parts: Vec<String> = s.done.iter().map(|(n, d)| format!("{n} {:.1}", ms(*d))).collect();
            out = Some(format!("total {:.1} ms: {} (ms)", ms(s.last - s.t0), parts.join(", ")));
        }
    });
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn steps_are_named_in_order_and_recording_stops_at_the_report() {
        super::begin();
        super::step("a");
        super::step("b");
        let r = super::report().expect("started");
        assert!(r.starts_with("total ") && r.contains(": a ") && r.contains(", b "), "{r}");
        super::step("after");
        assert!(super::report().is_none());
    }
}
