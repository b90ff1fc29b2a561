use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
fn machine() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<f64> = s.lines().next().unwrap().split_whitespace().skip(1).take(8).map(|x| x.parse().unwrap()).collect();
    (f.iter().sum::<f64>() - f[3] - f[4]) * 10.0
}
fn main() {
    let mode = std::env::args().nth(1).unwrap();
    let n = 800;
    let next = AtomicUsize::new(0);
    let _ballast: Vec<u8> = vec![1u8; 8 << 20]; // a harness-sized heap
    let m0 = machine();
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| loop {
                if next.fetch_add(1, Ordering::SeqCst) >= n { break; }
                let mut c = Command::new("/tmp/del2w/raw");
                c.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
                if mode == "fork" { unsafe { c.pre_exec(|| Ok(())); } }
                let child = c.spawn().unwrap();
                if mode != "nowatch" && mode != "fork-nowatch" {
                    let h = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_micros(1)));
                    let _ = child.wait_with_output(); h.join().unwrap();
                } else { let _ = child.wait_with_output(); }
            });
        }
    });
    println!("{mode}: {:.3} ms machine CPU per spawn, {:.0} spawns/s", (machine() - m0) / n as f64, n as f64 / t.elapsed().as_secs_f64());
}
