//! Run-time choice of the compute device (the flex CPU backend, or CUDA with feature `cuda`)
//! and of the precision of the frozen backbone's products.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The CPU backend (burn-flex: pure Rust, SIMD, multithreaded).
pub type Cpu = burn::backend::Flex;
/// The CUDA backend.
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

/// Largest allocation glibc serves from its heaps rather than a fresh `mmap` (its own cap).
pub const HEAP_ALLOCATION_MAX: usize = 32 << 20;
/// Free memory at the top of a heap that glibc keeps rather than returns to the kernel.
pub const HEAP_KEEP_FREE: usize = 64 << 20;

/// Lets the CPU backend's tensors reuse freed memory instead of faulting in new pages.
///
/// A step allocates and frees activations of up to ~20 MB at ViT-B/32 by the thousand.
/// glibc's adaptive thresholds mapped and unmapped many of them afresh (each page then
/// zero-filled by the kernel on first touch: 520,000 page faults in `bench --only
/// train,image`, 320,000 with these limits, and +5 % images/s on a Xeon; issue #15).
/// Keeping at most 64 MB free per heap bounds what an idle daemon holds on to. Call it
/// first in `main`, before any thread allocates; a no-op outside glibc.
pub fn tune_cpu_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets glibc's allocation parameters (under its own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_ALLOCATION_MAX as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, HEAP_KEEP_FREE as libc::c_int);
    }
}

/// Returns the free memory of every heap to the kernel (glibc's `malloc_trim`), including
/// free pages in the middle of a heap that the trim threshold never gives back: called after
/// a training run, so that an idle daemon does not keep the run's peak resident. A no-op
/// outside glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases pages that no allocation uses (under its own locks).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Where tensors live, as given on the command line or in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    #[default]
    Cpu,
    /// GPU ordinal.
    Cuda(usize),
}

/// The device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}` (expected cpu, cuda or cuda:N)")]
    Unknown(String),
    #[error(
        "--device cuda needs a build with CUDA support: rebuild with `cargo build --release --features cuda`"
    )]
    NotCompiled,
    #[error("CUDA device {ordinal} is not usable (no NVIDIA driver or GPU found?): {reason}")]
    Unavailable { ordinal: usize, reason: String },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Unknown(other.to_string())),
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = DeviceError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(value: DeviceChoice) -> Self {
        value.to_string()
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(0) => write!(f, "cuda"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Float type of the frozen backbone's block weights (q/k/v/out projections and MLP layers,
/// ~95 % of a ViT's FLOPs), in which their products run.
///
/// `bf16`/`f16` is mixed precision as PyTorch's autocast does it: the input is rounded to
/// the weight's type for the product (accumulated in f32 by the GPU's tensor cores), and the
/// output comes back as f32; LayerNorm, softmax, residuals, the adapter, its gradients and the
/// loss stay f32. For GPUs: the CPU backend has no half-precision products (it converts to
/// f32 and back, slower than `f32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BackbonePrecision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl BackbonePrecision {
    /// The weights' float type; `None` for f32 (left as loaded).
    pub fn narrow_dtype(self) -> Option<burn::tensor::FloatDType> {
        match self {
            Self::F32 => None,
            Self::Bf16 => Some(burn::tensor::FloatDType::BF16),
            Self::F16 => Some(burn::tensor::FloatDType::F16),
        }
    }

    /// Refuses a precision that `device` cannot compute in (e.g. bf16 before NVIDIA Ampere).
    pub fn check<B: burn::tensor::backend::Backend>(
        self,
        device: &B::Device,
    ) -> Result<(), PrecisionError> {
        match self.narrow_dtype() {
            Some(dtype) if !B::supports_dtype(device, dtype.into()) => {
                Err(PrecisionError::Unsupported {
                    precision: self,
                    device: format!("{device:?}"),
                })
            }
            _ => Ok(()),
        }
    }
}

/// The backbone precision cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    #[error("unknown backbone precision `{0}` (expected f32, bf16 or f16)")]
    Unknown(String),
    #[error(
        "the device {device} has no {precision} arithmetic: use model.backbone_precision = \"f32\""
    )]
    Unsupported {
        precision: BackbonePrecision,
        device: String,
    },
}

impl FromStr for BackbonePrecision {
    type Err = PrecisionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(PrecisionError::Unknown(other.to_string())),
        }
    }
}

impl TryFrom<String> for BackbonePrecision {
    type Error = PrecisionError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<BackbonePrecision> for String {
    fn from(value: BackbonePrecision) -> Self {
        value.to_string()
    }
}

impl fmt::Display for BackbonePrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

/// Checks that a CUDA device works before anything else touches it: burn panics on first use
/// of a missing driver, which we turn into an error.
#[cfg(feature = "cuda")]
pub fn cuda_device(ordinal: usize) -> Result<burn::backend::cuda::CudaDevice, DeviceError> {
    use burn::prelude::*;
    let device = burn::backend::cuda::CudaDevice::new(ordinal);
    let probe = device.clone();
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(move || {
        let t = Tensor::<Cuda, 1>::ones([4], &probe);
        t.sum().into_scalar()
    });
    std::panic::set_hook(previous_hook);
    match result {
        Ok(sum) if (sum - 4.0).abs() < 1e-6 => Ok(device),
        Ok(sum) => Err(DeviceError::Unavailable {
            ordinal,
            reason: format!("probe computed {sum} instead of 4"),
        }),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the backend panicked".into());
            Err(DeviceError::Unavailable { ordinal, reason })
        }
    }
}

/// Runs `$body` with `$B` bound to the backend type and `$device` to its device.
///
/// ```ignore
/// with_backend!(choice, B, device => embed::<B>(&device, args))
/// ```
#[macro_export]
macro_rules! with_backend {
    ($choice:expr, $B:ident, $device:ident => $body:expr) => {{
        match $choice {
            $crate::model::device::DeviceChoice::Cpu => {
                type $B = $crate::model::device::Cpu;
                let $device = burn::backend::flex::FlexDevice;
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::model::device::DeviceChoice::Cuda(ordinal) => {
                type $B = $crate::model::device::Cuda;
                let $device = $crate::model::device::cuda_device(ordinal)?;
                $body
            }
            #[cfg(not(feature = "cuda"))]
            $crate::model::device::DeviceChoice::Cuda(_) => {
                Err($crate::model::device::DeviceError::NotCompiled.into())
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:2".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(2)
        );
        assert!("tpu".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn parses_precisions_and_the_cpu_computes_in_each() {
        for (text, precision) in [
            ("f32", BackbonePrecision::F32),
            ("bf16", BackbonePrecision::Bf16),
            ("f16", BackbonePrecision::F16),
        ] {
            assert_eq!(text.parse::<BackbonePrecision>().unwrap(), precision);
            assert_eq!(precision.to_string(), text);
            assert!(precision.check::<Cpu>(&Default::default()).is_ok());
        }
        assert!("fp8".parse::<BackbonePrecision>().is_err());
        assert_eq!(BackbonePrecision::default(), BackbonePrecision::F32);
    }
}
