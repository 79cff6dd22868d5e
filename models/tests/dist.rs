//! The c10d process group through the shim, for real: ranks as threads of this test, Gloo over 127.0.0.1 on a
//! free port, bounded timeouts. All-reduce, broadcast, all-gather of unequal slices, the all-gather whose
//! gradient reaches each rank's own rows (checked against the same loss on one process), and a dead rank turning
//! into an error instead of a hang.

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
    }
}

/// Runs `f(rank, dist)` on `world` threads, one group per thread, and returns their results in rank order.
fn ranks<T: Send + 'static>(world: usize, f: fn(usize, &Dist) -> T) -> Vec<T> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            std::thread::spawn(move || {
                let dist = Dist::connect(&spec(rank, world, port, 30), Device::Cpu).expect("joining the group");
                f(rank, &dist)
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
