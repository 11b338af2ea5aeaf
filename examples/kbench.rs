//! Times the quantized products on each path (the file's layout and
//! `packed`), and the dequantize + f32 GEMM
//! path that long prefills take:
//! `cargo run --release --example kbench -- N K M [REPS]` (run with
//! `RAYON_NUM_THREADS` set to the threads to use).
use candle_core::{Device, Tensor};
use errand::model::qkernel::{dequantize, matmul, packed, Kind, Path};
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().expect("numbers: N K M [REPS]")).collect();
    let (n, k, m) = (a.first().copied().unwrap_or(4864), a.get(1).copied().unwrap_or(896), a.get(2).copied().unwrap_or(1));
    let reps = a.get(3).copied().unwrap_or(100);
    for kind in [Kind::Q5_0, Kind::Q8_0] {
        let bb = kind.block_bytes();
        // Valid blocks: a small f16 scale (0x2000 ~ 0.008), anything else random.
        let bytes: Vec<u8> =
            (0..n * k / 32 * bb).map(|i| if i % bb == 1 { 0x20 } else if i % bb == 0 { 0 } else { (i * 7919 % 251) as u8 }).collect();
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 97) as f32 - 48.0) / 10.0).collect();
        let time = |f: &dyn Fn() -> f32| {
            let t = Instant::now();
            let mut s = 0.0;
            for _ in 0..reps {
                s += f();
            }
            (t.elapsed().as_secs_f64() * 1e6 / reps as f64, s)
        };
        for path in [Path::Avx2, Path::Auto] {
            let (us, s) = time(&|| matmul(kind, &bytes, n, k, &x, path)[0]);
            let ns_block = us * 1e3 / (n * k / 32) as f64;
            println!("{kind:?} {:>6?} n={n} k={k} m={m}: {us:>8.0} us, {ns_block:.2} ns per weight block [{s:.3}]", path.resolve());
        }
        if let Some(p) = packed::Packed::new(kind, &bytes, n, k) {
            for path in [Path::Avx2, Path::Auto] {
                let (us, s) = time(&|| packed::matmul(&p, &x, path)[0]);
                let ns_block = us * 1e3 / (n * k / 32) as f64;
                println!("{kind:?} {:>6?} packed n={n} k={k} m={m}: {us:>8.0} us, {ns_block:.2} ns per weight block [{s:.3}]", path.resolve());
            }
        }
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let (us, s) = time(&|| {
            let wf = dequantize(kind, &bytes, n, k, Path::Auto);
            let w = Tensor::from_vec(wf, (n, k), &Device::Cpu).unwrap();
            xt.broadcast_matmul(&w.t().unwrap()).unwrap().flatten_all().unwrap().get(0).unwrap().to_scalar::<f32>().unwrap()
        });
        println!("{kind:?}   gemm n={n} k={k} m={m}: {us:>8.0} us (dequantize + f32 GEMM) [{s:.3}]");
    }
}
