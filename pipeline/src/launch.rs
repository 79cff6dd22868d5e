//! Who this process is in a multi-process run, read the ways users already launch: `torchrun` (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), SLURM's `srun` (`SLURM_PROCID`,
//! `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE`, the first host of `SLURM_STEP_NODELIST` /
//! `SLURM_JOB_NODELIST`), or our own launcher ([`launch_local`]: `selfsup pretrain --nproc-per-node N`, which sets
//! the torchrun variables). None of them: one process.

use std::ffi::OsString;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use selfsup_models::dist::{Backend, GroupSpec};
use tch::Device;

use crate::config::{DistBackend, DistConfig};
use crate::{Error, Result};

/// This process's place in the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// Rank on this machine: the GPU it binds.
    pub local_rank: usize,
    pub local_world: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// What launched it (`torchrun`, `slurm`, `one process`), for messages.
    pub by: &'static str,
}

impl Launch {
    pub fn single() -> Launch {
        Launch {
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            by: "one process",
        }
    }

    /// From the environment (see the module doc); a variable that is set but malformed is an error naming it.
    pub fn from_env() -> Result<Launch> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Launch::from_env`] over any variable lookup (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Launch> {
        let num = |k: &str| -> Result<Option<usize>> {
            var(k)
                .map(|v| v.trim().parse::<usize>().map_err(|_| Error::Other(format!("{k}={v:?}: not a number"))))
                .transpose()
        };
        let port = |default: Option<u16>| -> Result<u16> {
            match var("MASTER_PORT") {
                Some(v) => v.trim().parse().map_err(|_| Error::Other(format!("MASTER_PORT={v:?}: not a port number"))),
                None => default.ok_or_else(|| Error::Other("MASTER_PORT is not set".into())),
            }
        };
        let launch = if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
            let local_world = num("LOCAL_WORLD_SIZE")?.unwrap_or(world);
            Launch {
                rank,
                world,
                local_rank: num("LOCAL_RANK")?.unwrap_or(rank % local_world.max(1)),
                local_world,
                master_addr: var("MASTER_ADDR")
                    .ok_or_else(|| Error::Other("RANK is set but MASTER_ADDR is not".into()))?,
                master_port: port(None)?,
                by: if var("SELFSUP_LAUNCHER").is_some() { "selfsup --nproc-per-node" } else { "torchrun" },
            }
        } else if let (Some(rank), Some(world)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            if world <= 1 {
                return Ok(Launch::single());
            }
            let nodelist = var("SLURM_STEP_NODELIST").or_else(|| var("SLURM_JOB_NODELIST")).unwrap_or_default();
            let master = match var("MASTER_ADDR") {
                Some(a) => a,
                None => first_host(&nodelist)
                    .ok_or_else(|| Error::Other(format!("SLURM node list {nodelist:?}: no host in it")))?,
            };
            // Tasks per node: "4" or "4(x2)" (the first node's count).
            let per_node = var("SLURM_NTASKS_PER_NODE")
                .or_else(|| var("SLURM_TASKS_PER_NODE"))
                .and_then(|v| v.split(['(', ',']).next().and_then(|n| n.trim().parse::<usize>().ok()))
                .unwrap_or(world);
            // A port from the job id, so that two jobs on one node do not meet (as torch's SLURM recipes do).
            let job = num("SLURM_JOB_ID")?.unwrap_or(0);
            Launch {
                rank,
                world,
                local_rank: num("SLURM_LOCALID")?.unwrap_or(rank % per_node.max(1)),
                local_world: per_node,
                master_addr: master,
                master_port: port(Some(20000 + (job % 20000) as u16))?,
                by: "slurm",
            }
        } else {
            return Ok(Launch::single());
        };
        if launch.world == 0 || launch.rank >= launch.world || launch.local_rank >= launch.local_world.max(1) {
            return Err(Error::Other(format!(
                "{}: rank {} (local {}) is out of range for world size {} (local {})",
                launch.by, launch.rank, launch.local_rank, launch.world, launch.local_world
            )));
        }
        Ok(launch)
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Started by a launcher (ours, torchrun, SLURM with more than one task): the process joins its group, also
    /// a group of one (as torch.distributed does), so that `--nproc-per-node 1` runs the data-parallel path.
    pub fn launched(&self) -> bool {
        self.by != Launch::single().by
    }

    /// The process group to join for `cfg` on `device`.
    pub fn group_spec(&self, cfg: &DistConfig, device: Device) -> Result<GroupSpec> {
        let backend = match (cfg.backend, device.is_cuda()) {
            (DistBackend::Auto, true) | (DistBackend::Nccl, true) => Backend::Nccl,
            (DistBackend::Auto, false) | (DistBackend::Gloo, _) => Backend::Gloo,
            (DistBackend::Nccl, false) => {
                return Err(Error::Other("dist.backend = \"nccl\" needs CUDA (train.device is the CPU)".into()))
            }
        };
        Ok(GroupSpec {
            backend,
            rank: self.rank,
            world: self.world,
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
            timeout: Duration::from_secs_f64(cfg.timeout_s),
            gloo_iface: std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default(),
            agent_store: std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v.eq_ignore_ascii_case("true")),
            // One machine: Gloo's loopback always works. Across machines only where the user named Gloo's
            // interface (a hostname resolving to 127.0.1.1, Debian's default, would leave it unreachable).
            host_channel: self.local_world >= self.world || std::env::var_os("GLOO_SOCKET_IFNAME").is_some(),
        })
    }

    /// This rank's share of the machine's cores (for the loader and torch's intra-op threads).
    pub fn cpu_share(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / self.local_world.max(1)).max(1)
    }
}

/// The first host of a SLURM node list: `gpu[01-04,07],cpu3` → `gpu01`, `node7` → `node7`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first entry: up to a comma outside brackets.
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let first = &list[..end];
    match first.find('[') {
        None => (!first.is_empty()).then(|| first.to_string()),
        Some(open) => {
            let (prefix, rest) = (&first[..open], &first[open + 1..]);
            let range = rest.split([',', ']']).next()?;
            let lo = range.split('-').next()?;
            Some(format!("{prefix}{lo}"))
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: another process could take it in between, which the
/// rendezvous then reports).
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Other(format!("finding a free port: {e}")))
}

/// Runs `nproc` copies of this program with `args` as ranks 0..nproc of one run on this machine (the torchrun
/// variables set, the master on 127.0.0.1 at a free port), forwarding SIGINT, SIGTERM and SIGUSR1 to every rank.
/// When a rank fails, the others are stopped (SIGTERM, then SIGKILL after `grace`). Returns the exit code: 0 when
/// every rank succeeded, else the first failing rank's (128 + signal for one killed by a signal).
pub fn launch_local(nproc: usize, args: &[OsString], grace: Duration) -> Result<i32> {
    let exe = std::env::current_exe().map_err(|e| Error::Other(format!("finding this program: {e}")))?;
    let port = free_port()?;
    let flags: Vec<(i32, Arc<AtomicBool>)> = [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1]
        .into_iter()
        .map(|sig| {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(sig, flag.clone())
                .map(|_| (sig, flag))
                .map_err(|e| Error::Other(format!("installing the launcher's signal handlers: {e}")))
        })
        .collect::<Result<_>>()?;
    let mut children: Vec<Option<Child>> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&exe);
        // Its own process group: a Ctrl-C at the terminal reaches the launcher only, which forwards it once (the
        // ranks would otherwise get it twice, and a second SIGINT exits at once, without a checkpoint). And a
        // SIGTERM when the launcher dies, so that no rank trains on as an orphan.
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("SELFSUP_LAUNCHER", "1")
            .spawn();
        match child {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                stop_all(&mut children, grace);
                return Err(Error::Other(format!("starting rank {rank}: {e}")));
            }
        }
    }
    crate::say!("launched {nproc} ranks (master 127.0.0.1:{port})");
    let mut code = 0;
    // A stop (SIGINT/SIGTERM) forwarded to the ranks: they exit 130/143 one by one, each after its part of the
    // final checkpoint; the launcher then waits for all instead of stopping the others (a second signal would
    // make them exit at once).
    let mut stopping = false;
    loop {
        for (sig, flag) in &flags {
            if flag.swap(false, Ordering::SeqCst) {
                stopping |= *sig != libc::SIGUSR1;
                for c in children.iter().flatten() {
                    // SAFETY: plain kill(2) on our own children's PIDs.
                    unsafe { libc::kill(c.id() as i32, *sig) };
                }
            }
        }
        let mut running = 0;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(Some(status)) => {
                    *slot = None;
                    let c = exit_code(status);
                    if c != 0 && code == 0 {
                        code = c;
                        if !stopping {
                            crate::say!("rank {rank} exited with {status}: stopping the other ranks");
                        }
                    }
                }
                Ok(None) => running += 1,
                Err(e) => return Err(Error::Other(format!("waiting for rank {rank}: {e}"))),
            }
        }
        if running == 0 {
            return Ok(code);
        }
        if code != 0 && !stopping {
            stop_all(&mut children, grace);
            return Ok(code);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// SIGTERM to every running child, SIGKILL to those still running after `grace`, then reaps them all.
fn stop_all(children: &mut [Option<Child>], grace: Duration) {
    for c in children.iter().flatten() {
        // SAFETY: kill(2) on our own children.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    let start = Instant::now();
    while children.iter_mut().flatten().any(|c| matches!(c.try_wait(), Ok(None))) && start.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in children.iter_mut().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn torchrun_slurm_and_nothing() {
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), Launch::single());
        let t = Launch::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(
            (t.rank, t.world, t.local_rank, t.local_world, t.master_port, t.by),
            (3, 8, 1, 2, 29500, "torchrun")
        );
        let s = Launch::from_vars(vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .unwrap();
        assert_eq!((s.rank, s.world, s.local_rank, s.local_world), (5, 8, 1, 4));
        assert_eq!((s.master_addr.as_str(), s.master_port), ("gpu07", 20000 + 3456));
        // One SLURM task is one process.
        assert_eq!(Launch::from_vars(vars(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")])).unwrap(), Launch::single());
        // Malformed or inconsistent: errors naming the variable.
        let e = Launch::from_vars(vars(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err().to_string();
        assert!(e.contains("RANK"), "{e}");
        let e =
            Launch::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")]))
                .unwrap_err()
                .to_string();
        assert!(e.contains("out of range"), "{e}");
        let e = Launch::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_PORT"), "{e}");
    }

    #[test]
    fn slurm_node_lists() {
        assert_eq!(first_host("gpu[01-04,07],cpu3").as_deref(), Some("gpu01"));
        assert_eq!(first_host("node7").as_deref(), Some("node7"));
        assert_eq!(first_host("a1,b2").as_deref(), Some("a1"));
        assert_eq!(first_host("n[3,5]").as_deref(), Some("n3"));
        assert_eq!(first_host(""), None);
    }
}
