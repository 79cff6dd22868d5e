//! The c10d process group through the shim, for real: ranks as threads of this test, Gloo over 127.0.0.1 on a
//! free port, bounded timeouts. All-reduce, broadcast, all-gather of unequal slices, the all-gather whose
//! gradient reaches each rank's own rows (checked against the same loss on one process), and a dead rank turning
//! into an error instead of a hang.

use std::sync::Arc;
use std::time::{Duration, Instant};

use selfsup_models::dist::{Backend, Dist, GroupSpec};
use tch::{Device, Kind, Tensor};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spec(rank: usize, world: usize, port: u16, timeout_s: u64) -> GroupSpec {
    GroupSpec {
        backend: Backend::Gloo,
        rank,
        world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout: Duration::from_secs(timeout_s),
        gloo_iface: String::new(),
        agent_store: false,
        host_channel: false,
    }
}

/// Runs `f(rank, dist)` on `world` threads, one group per thread, and returns their results in rank order.
fn ranks<T: Send + 'static>(world: usize, f: fn(usize, &Arc<Dist>) -> T) -> Vec<T> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            std::thread::spawn(move || {
                let dist = Dist::connect(&spec(rank, world, port, 30), Device::Cpu).expect("joining the group");
                f(rank, &Arc::new(dist))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
}

#[test]
fn all_reduce_broadcast_and_gathers_of_unequal_slices() {
    let out = ranks(3, |rank, d| {
        assert_eq!((d.rank(), d.world(), d.is_main()), (rank, 3, rank == 0));
        let mut t = Tensor::from_slice(&[rank as f32, 1.0]);
        d.all_reduce_sum(&mut t).unwrap();
        let mut b = Tensor::from_slice(&[10.0 * (rank as f64 + 1.0)]);
        d.broadcast(&mut b, 2).unwrap();
        // Rank r holds r + 1 rows of [r, r].
        let x = Tensor::full([rank as i64 + 1, 2], rank as f64, (Kind::Float, Device::Cpu));
        let g = d.all_gather(&x).unwrap();
        // Host numbers (through Gloo itself here; beside NCCL, a Gloo group of their own).
        let mut h = [rank as i64, 1, -(1 << 40)];
        d.all_reduce_host(&mut h).unwrap();
        assert_eq!(h, [3, 3, -3 << 40]);
        d.barrier().unwrap();
        (Vec::<f32>::try_from(t).unwrap(), b.double_value(&[0]), Vec::<f32>::try_from(g.flatten(0, -1)).unwrap())
    });
    for (sum, b, g) in out {
        assert_eq!(sum, vec![3.0, 3.0]);
        assert_eq!(b, 30.0);
        assert_eq!(g, vec![0., 0., 1., 1., 1., 1., 2., 2., 2., 2., 2., 2.]);
    }
}

/// A loss over the gathered rows, computed by every rank: each rank's rows get the gradient of the same loss on
/// one process holding every row, times the world size (gather's backward sums every rank's copy of the loss),
/// which the trainer's averaging of parameter gradients (sum / world) divides back.
#[test]
fn gather_gradients_reach_the_rows_owner() {
    fn loss(all: &Tensor) -> Tensor {
        // Mixes rows (like a contrastive loss): every row's gradient depends on every other row.
        let sim = all.matmul(&all.transpose(0, 1));
        sim.logsumexp([1], false).mean(Kind::Float)
    }
    fn data() -> Tensor {
        Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([6, 2]) / 7.0
    }
    let whole = data().set_requires_grad(true);
    loss(&whole).backward();
    let expected = Vec::<f32>::try_from(whole.grad().flatten(0, -1)).unwrap();

    let per_rank = ranks(2, |rank, d| {
        let x = data().narrow(0, 3 * rank as i64, 3).set_requires_grad(true);
        let all = d.gather(&x);
        assert_eq!(all.size(), [6, 2]);
        loss(&all).backward();
        assert!(d.take_error().is_none());
        // The trainer averages parameter gradients over the ranks (sum / world); for these rows, owned by this
        // rank alone, that is their gradient / world.
        Vec::<f32>::try_from((x.grad() / 2.0).flatten(0, -1)).unwrap()
    });
    let got: Vec<f32> = per_rank.concat();
    for (a, b) in got.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-6, "{got:?} vs {expected:?}");
    }
}

/// Gradients averaged while backward runs (hooks on the gradient accumulators, small buckets so that there are
/// several): every rank ends with the mean of the ranks' gradients, exactly what averaging after backward gives,
/// with a parameter used twice in the graph, one that gets no gradient (it keeps none) and a second step after
/// the first (the hooks re-armed); a gradient produced twice while armed is an error, not a wrong average.
#[test]
fn gradients_averaged_during_backward_equal_averaging_after_it() {
    fn params() -> Vec<Tensor> {
        let w1 = (Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([4, 3]) / 10.0).set_requires_grad(true);
        let unused = Tensor::ones([5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let w3 = Tensor::from_slice(&[0.5f32, -1.0, 2.0]).set_requires_grad(true);
        // Buckets of 8 in reverse order: [w3] and [w1] start during backward, [unused] in finish.
        vec![unused, w1, w3]
    }
    fn loss(p: &[Tensor], rank: usize, step: usize) -> Tensor {
        let x = Tensor::from_slice(&[1.0f32, 2.0 - rank as f32, 0.5 * step as f32 + 0.25]).reshape([1, 3]);
        // w1 twice, w3 once; nothing of p[0].
        let h = x.matmul(&p[1].tr()).tanh().matmul(&p[1]);
        (&h * &p[2]).sum(Kind::Float).square()
    }
    fn grads(p: &[Tensor]) -> Vec<Option<Vec<f32>>> {
        p.iter().map(|t| t.grad().defined().then(|| Vec::try_from(t.grad().flatten(0, -1)).unwrap())).collect()
    }
    let out = ranks(2, |rank, d| {
        let mut p = params();
        let mut ov = d.overlap(&p, 8).unwrap().expect("a group");
        let mut steps = Vec::new();
        for step in 0..2 {
            for t in p.iter_mut() {
                t.zero_grad();
            }
            ov.arm();
            loss(&p, rank, step).backward();
            ov.finish().unwrap();
            assert_eq!(ov.started_during_backward(), 2);
            // What one process would compute: the mean of both ranks' gradients, from fresh copies.
            let mut expected: Vec<Vec<f32>> = Vec::new();
            for r in 0..2 {
                let q: Vec<Tensor> = params();
                loss(&q, r, step).backward();
                let g: Vec<f32> =
                    Vec::try_from(Tensor::cat(&[q[1].grad().flatten(0, -1), q[2].grad().flatten(0, -1)], 0)).unwrap();
                expected.push(g);
            }
            let mean: Vec<f32> = expected[0].iter().zip(&expected[1]).map(|(a, b)| (a + b) / 2.0).collect();
            steps.push((grads(&p), mean));
        }
        // Twice while armed: refused.
        for t in p.iter_mut() {
            t.zero_grad();
        }
        ov.arm();
        loss(&p, rank, 0).backward();
        loss(&p, rank, 1).backward();
        let twice = ov.finish().err().map(|e| e.to_string()).unwrap_or_default();
        (steps, twice)
    });
    for (steps, twice) in out {
        for (got, mean) in steps {
            assert!(got[0].is_none(), "the unused parameter got a gradient: {:?}", got[0]);
            let flat: Vec<f32> = [got[1].clone().unwrap(), got[2].clone().unwrap()].concat();
            for (a, b) in flat.iter().zip(&mean) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{flat:?} vs {mean:?}");
            }
        }
        assert!(twice.contains("twice in one backward"), "{twice}");
    }
}

#[test]
fn a_rank_that_never_joins_is_an_error_within_the_timeout() {
    let port = free_port();
    let t = Instant::now();
    let err = Dist::connect(&spec(0, 2, port, 3), Device::Cpu).err().expect("joining alone must fail");
    let msg = err.to_string();
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(msg.contains("rank 0 of 2") && msg.contains(&port.to_string()), "{msg}");
}

#[test]
fn a_rank_that_dies_mid_run_is_an_error_for_the_other() {
    let port = free_port();
    let survivor = std::thread::spawn(move || {
        let d = Dist::connect(&spec(0, 2, port, 10), Device::Cpu).unwrap();
        let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        d.all_reduce_sum(&mut t).unwrap();
        let t0 = Instant::now();
        // Rank 1 is gone: the next all-reduce must fail, not hang.
        let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let err = d.all_reduce_sum(&mut t).expect_err("the peer is gone");
        (t0.elapsed(), err.to_string())
    });
    {
        let d = Dist::connect(&spec(1, 2, port, 10), Device::Cpu).unwrap();
        let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        d.all_reduce_sum(&mut t).unwrap();
        // Dropped: its sockets close, as when a process dies.
    }
    let (waited, msg) = survivor.join().unwrap();
    assert!(waited < Duration::from_secs(15), "{waited:?}: {msg}");
    assert!(msg.contains("all-reduce") && msg.contains("rank 0 of 2"), "{msg}");
}

/// A batch norm with a deterministic affine init (tch's default draws the weight from torch's RNG, which the
/// rank threads share).
fn bn_of(vs: &tch::nn::VarStore) -> tch::nn::BatchNorm {
    let cfg = tch::nn::BatchNormConfig {
        ws_init: tch::nn::Init::Const(1.5),
        bs_init: tch::nn::Init::Const(0.25),
        ..Default::default()
    };
    tch::nn::batch_norm2d(vs.root(), 3, cfg)
}

/// Synchronized batch norm over 2 ranks: the output, the running statistics and the gradients (input rows,
/// weight and bias, the latter summed over the ranks as the trainer's averaging x world) of one batch norm on
/// the whole batch.
#[test]
fn sync_batch_norm_is_one_batch_norm_over_the_global_batch() {
    fn data() -> Tensor {
        // Not from torch's RNG: the ranks are threads of one process and would share it.
        (Tensor::arange(8 * 3 * 16, (Kind::Float, Device::Cpu)).reshape([8, 3, 4, 4]) * 0.37).sin() * 2.0 + 0.5
    }
    fn upstream(y: &Tensor) -> Tensor {
        // A loss that weighs rows differently, so the gradient through the statistics matters.
        let w = Tensor::arange(y.numel() as i64, (Kind::Float, Device::Cpu)).reshape(y.size()) / 100.0;
        (y * w).sum(Kind::Float) + y.pow_tensor_scalar(2).sum(Kind::Float) * 0.1
    }
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let bn = bn_of(&vs);
    let x = data().set_requires_grad(true);
    let y = tch::nn::ModuleT::forward_t(&bn, &x, true);
    upstream(&y).backward();
    let flat = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
    let expected = (
        flat(&y),
        flat(&x.grad()),
        flat(&bn.ws.as_ref().unwrap().grad()),
        flat(&bn.running_mean),
        flat(&bn.running_var),
    );

    let got = ranks(2, |rank, d| {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let bn = bn_of(&vs);
        let x = data().narrow(0, 4 * rank as i64, 4).set_requires_grad(true);
        let y = d.sync_batch_norm(&x, &bn, 1e-5, 0.1);
        // Each rank's loss is its rows' share of the same loss.
        let w =
            Tensor::arange(8 * 3 * 16, (Kind::Float, Device::Cpu)).reshape([8, 3, 4, 4]).narrow(0, 4 * rank as i64, 4)
                / 100.0;
        ((&y * w).sum(Kind::Float) + y.pow_tensor_scalar(2).sum(Kind::Float) * 0.1).backward();
        assert!(d.take_error().is_none());
        let mut gw = bn.ws.as_ref().unwrap().grad();
        d.all_reduce_sum(&mut gw).unwrap();
        let flat = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        (flat(&y), flat(&x.grad()), flat(&gw), flat(&bn.running_mean), flat(&bn.running_var))
    });
    let close = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}: {a:?} vs {b:?}");
        }
    };
    close(&[got[0].0.clone(), got[1].0.clone()].concat(), &expected.0, "output");
    close(&[got[0].1.clone(), got[1].1.clone()].concat(), &expected.1, "input gradient");
    for g in &got {
        close(&g.2, &expected.2, "weight gradient (summed over the ranks)");
        close(&g.3, &expected.3, "running mean");
        close(&g.4, &expected.4, "running variance");
    }
}

/// NCCL without a GPU (this CPU machine): a clear error from the shim, not a C++ abort. (On a GPU machine this
/// test has nothing to show and says so.)
#[test]
fn nccl_without_a_gpu_is_an_error_not_an_abort() {
    if tch::Cuda::is_available() {
        eprintln!("SKIPPED: CUDA is visible; this test checks the error NCCL gives without a GPU");
        return;
    }
    let port = free_port();
    let errors: Vec<String> = (0..2)
        .map(|rank| {
            std::thread::spawn(move || {
                let mut s = spec(rank, 2, port, 20);
                s.backend = Backend::Nccl;
                Dist::connect(&s, Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    for e in &errors {
        assert!(e.contains("NCCL") || e.contains("GPU") || e.contains("CUDA"), "{e}");
    }
    eprintln!("NCCL without a GPU: {}", errors[0]);
}
