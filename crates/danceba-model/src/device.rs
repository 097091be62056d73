//! Device selection: `auto` picks Metal on macOS builds with the `metal` feature, CUDA when built
//! with `cuda` and a GPU is present, else the CPU.

use candle_core::Device;

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Metal,
    Cuda,
}

/// Errors of device selection.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: use one of auto, cpu, metal, cuda")]
    Unknown(String),
    #[error("this build of danceba has no {0} support: rebuild with `--features {0}`")]
    NotBuilt(&'static str),
    #[error("could not open the {what} device: {source}")]
    Open {
        what: &'static str,
        #[source]
        source: candle_core::Error,
    },
}

impl std::str::FromStr for DeviceChoice {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" | "mps" => Ok(Self::Metal),
            "cuda" | "gpu" => Ok(Self::Cuda),
            _ => Err(DeviceError::Unknown(s.to_string())),
        }
    }
}

/// Opens the device the user asked for. `Auto` never fails: it falls back to the CPU.
pub fn open(choice: DeviceChoice) -> Result<Device, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Metal => open_metal(),
        DeviceChoice::Cuda => open_cuda(),
        DeviceChoice::Auto => Ok(open_metal().or_else(|_| open_cuda()).unwrap_or(Device::Cpu)),
    }
}

/// A short human-readable name of a device.
pub fn describe(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

#[cfg(feature = "metal")]
fn open_metal() -> Result<Device, DeviceError> {
    Device::new_metal(0).map_err(|source| DeviceError::Open {
        what: "Metal",
        source,
    })
}

#[cfg(not(feature = "metal"))]
fn open_metal() -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt("metal"))
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<Device, DeviceError> {
    Device::new_cuda(0).map_err(|source| DeviceError::Open {
        what: "CUDA",
        source,
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt("cuda"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_choices_and_rejects_unknown() {
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        let err = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(err.contains("tpu") && err.contains("cpu"), "{err}");
    }

    #[test]
    fn auto_always_opens_something_and_cpu_is_cpu() {
        assert!(open(DeviceChoice::Auto).is_ok());
        assert!(matches!(open(DeviceChoice::Cpu).unwrap(), Device::Cpu));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn unbuilt_backend_says_how_to_get_it() {
        let err = open(DeviceChoice::Cuda).unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
