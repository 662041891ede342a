//! Eight f32 lanes as a plain array type whose element-wise operators LLVM turns into single
//! AVX instructions: portable code for the kernels that are not GEMMs (Winograd transforms,
//! pooling, direct convolution), which then vectorise regardless of how their loops are shaped.

pub const L: usize = 8;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct V8(pub [f32; L]);

impl std::ops::Add for V8 {
    type Output = V8;
    #[inline(always)]
    fn add(mut self, o: V8) -> V8 {
        for l in 0..L {
            self.0[l] += o.0[l];
        }
        self
    }
}
impl std::ops::Sub for V8 {
    type Output = V8;
    #[inline(always)]
    fn sub(mut self, o: V8) -> V8 {
        for l in 0..L {
            self.0[l] -= o.0[l];
        }
        self
    }
}
impl std::ops::Mul<V8> for f32 {
    type Output = V8;
    #[inline(always)]
    fn mul(self, mut o: V8) -> V8 {
        for l in 0..L {
            o.0[l] *= self;
        }
        o
    }
}

impl V8 {
    #[inline(always)]
    pub fn splat(v: f32) -> V8 {
        V8([v; L])
    }
    /// `self + a * b` lane-wise.
    #[inline(always)]
    pub fn mul_add(mut self, a: f32, b: V8) -> V8 {
        for l in 0..L {
            self.0[l] += a * b.0[l];
        }
        self
    }
}

#[inline(always)]
pub fn load(s: &[f32], at: usize) -> V8 {
    V8(s[at..at + L].try_into().expect("8 lanes"))
}

#[inline(always)]
pub fn store(s: &mut [f32], at: usize, v: V8) {
    s[at..at + L].copy_from_slice(&v.0);
}
