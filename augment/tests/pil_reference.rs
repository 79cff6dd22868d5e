//! Resize and equalize against Pillow's outputs (`reference/make_pil_reference.py` made
//! `reference/pil.txt`). Resize may differ by one level where we run the vertical pass first
//! (Pillow always goes horizontal first and rounds in between); equalize must match exactly.

use selfsup_augment::{equalize, resize, Image};

fn pattern(w: u32, h: u32, c: u8, op: &str) -> Image {
    let mut data = Vec::new();
    for y in 0..h {
        for x in 0..w {
            for k in 0..c as u32 {
                data.push(match op {
                    "resize" => ((x * 37 + y * 91 + k * 53 + x * y * 7) % 256) as u8,
                    _ => ((x * x + y * 3) % 97 + 20 * k) as u8,
                });
            }
        }
    }
    Image::new(w, h, c, data).unwrap()
}

#[test]
fn matches_pillow() {
    let text = include_str!("reference/pil.txt");
    let mut checked = 0;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let op = it.next().unwrap();
        let n: Vec<u32> = it.by_ref().take(5).map(|v| v.parse().unwrap()).collect();
        let want: Vec<u8> = it.map(|v| v.parse().unwrap()).collect();
        let (w, h, c, ow, oh) = (n[0], n[1], n[2] as u8, n[3], n[4]);
        let src = pattern(w, h, c, op);
        if op == "resize" {
            let got = resize(&src, ow, oh);
            assert_eq!(got.data.len(), want.len());
            let worst = got.data.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            assert!(worst <= 1, "{w}x{h}x{c} -> {ow}x{oh}: off by {worst}\n{:?}\n{want:?}", got.data);
        } else {
            let mut got = src.clone();
            equalize(&mut got);
            assert_eq!(got.data, want, "equalize {w}x{h}x{c}");
        }
        checked += 1;
    }
    assert_eq!(checked, 13);
}
