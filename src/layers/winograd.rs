use super::conv::Conv;
pub fn applies(_c: &Conv) -> bool { false }
pub fn saved_len(_c: &Conv, _b: usize) -> usize { 0 }
pub fn conv3x3_forward(_c: &Conv, _n: usize, _x: &[f32], _w: &[f32], _b: &[f32], _y: &mut [f32], _s: Option<&mut Vec<f32>>) { unimplemented!() }
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_backward(_c: &Conv, _n: usize, _s: &[f32], _w: &[f32], _y: &[f32], _dy: &mut [f32], _dx: Option<&mut [f32]>, _dw: &mut [f32], _db: &mut [f32]) { unimplemented!() }
