use alexnet::layers::conv::*;
use alexnet::layers::pool::*;
use alexnet::layers::{Padding, Window};
use std::time::Instant;
fn main() {
    let c = Conv { win: Window::new(28, 28, 3, 1, Padding::Same).unwrap(), in_c: 1, out_c: 64, groups: 1, relu: true };
    let b = 64;
    let x: Vec<f32> = (0..b * 784).map(|i| (i % 97) as f32 * 0.01).collect();
    let w: Vec<f32> = (0..576).map(|i| (i % 13) as f32 * 0.01 - 0.05).collect();
    let bias = vec![0.01; 64];
    let mut y = vec![0.0; b * c.out_len()];
    let mut dy = vec![0.0; b * c.out_len()];
    let (mut dw, mut db) = (vec![0.0; 576], vec![0.0; 64]);
    let p = MaxPool { win: Window::new(28, 28, 3, 2, Padding::Same).unwrap(), channels: 64 };
    let mut py = vec![0.0; b * p.out_len()];
    let mut idx = vec![0u32; b * p.out_len()];
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..10 { conv_forward(&c, b, &x, &w, &bias, &mut y); }
        let f = t.elapsed().as_secs_f64() / 10.0;
        let t = Instant::now();
        for _ in 0..10 { dy.copy_from_slice(&y); conv_backward(&c, b, &x, &w, &y, &mut dy, None, &mut dw, &mut db); }
        let bw = t.elapsed().as_secs_f64() / 10.0;
        let t = Instant::now();
        for _ in 0..10 { max_pool_forward(&p, b, &y, &mut py, &mut idx); }
        println!("conv1 fwd {:.2} ms bwd {:.2} ms pool fwd {:.2}", f * 1e3, bw * 1e3, t.elapsed().as_secs_f64() / 10.0 * 1e3);
    }
}
