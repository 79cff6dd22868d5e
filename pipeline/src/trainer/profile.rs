//! `train.profile_steps`: where the time of a training step goes, host issuing vs device finishing, per phase.

use serde::Serialize;
use std::time::Instant;
use tch::Device;

/// Per phase of a training step (forward, backward, optimizer, online probe), the mean milliseconds the host took
/// to issue the work (`host_ms`) and the device took to finish it after that (`device_ms`, a synchronization right
/// after the phase): host-bound phases have `device_ms` near 0, device-bound ones a large one. `train.profile_steps`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepProfile {
    pub phases: [&'static str; 4],
    pub steps: u64,
    pub host_ms: [f64; 4],
    pub device_ms: [f64; 4],
}

/// Steps before `train.profile_steps` starts counting (cuDNN autotuning, allocator warm-up).
pub(super) const PROFILE_WARMUP: u64 = 10;

impl StepProfile {
    pub(super) fn new() -> Self {
        StepProfile { phases: ["forward", "backward", "optimizer", "online_probe"], ..Default::default() }
    }

    /// Runs phase `i`, adding its issue time and the synchronization after it.
    fn time<T>(&mut self, i: usize, device: Device, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        self.host_ms[i] += t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        synchronize(device);
        self.device_ms[i] += t1.elapsed().as_secs_f64() * 1e3;
        out
    }

    /// Sums to per-step means.
    pub(super) fn finish(mut self) -> Self {
        let n = self.steps.max(1) as f64;
        self.host_ms.iter_mut().chain(self.device_ms.iter_mut()).for_each(|x| *x /= n);
        self
    }
}

impl std::fmt::Display for StepProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step profile ({} synchronized steps), ms per step, host issuing + device finishing:", self.steps)?;
        for i in 0..4 {
            write!(f, " {} {:.2} + {:.2};", self.phases[i], self.host_ms[i], self.device_ms[i])?;
        }
        let total: f64 = self.host_ms.iter().chain(&self.device_ms).sum();
        write!(f, " total {total:.2}")
    }
}

/// The phases of one training step: timed into a [`StepProfile`] on profiled steps, just run on the others, so
/// both take the same calls.
pub(super) struct Phases<'a> {
    profile: Option<&'a mut StepProfile>,
    device: Device,
}

impl<'a> Phases<'a> {
    /// One step, counted in `profile` when given (after a synchronization: the previous step's work is not timed).
    pub(super) fn new(profile: Option<&'a mut StepProfile>, device: Device) -> Self {
        let profile = profile.map(|p| {
            synchronize(device);
            p.steps += 1;
            p
        });
        Phases { profile, device }
    }

    /// Runs phase `i` (an index into [`StepProfile::phases`]).
    pub(super) fn run<T>(&mut self, i: usize, f: impl FnOnce() -> T) -> T {
        match self.profile.as_deref_mut() {
            Some(p) => p.time(i, self.device, f),
            None => f(),
        }
    }
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_time_only_profiled_steps_and_average_per_step() {
        let mut profile = StepProfile::new();
        let sleep = |ms| std::thread::sleep(std::time::Duration::from_millis(ms));
        for step in 0..4u64 {
            let mut phases = Phases::new((step % 2 == 0).then_some(&mut profile), Device::Cpu);
            assert_eq!(phases.run(0, || 7), 7, "a phase returns what it ran");
            phases.run(2, || sleep(10));
        }
        let p = profile.finish();
        assert_eq!(p.steps, 2, "only the steps given the profile count");
        assert!(p.host_ms[2] >= 10.0 && p.host_ms[2] < 1000.0, "mean per profiled step: {:?}", p.host_ms);
        assert_eq!((p.host_ms[1], p.host_ms[3]), (0.0, 0.0), "phases never run stay at 0");
        assert!(p.to_string().contains("optimizer"), "{p}");
    }
}
