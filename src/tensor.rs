//! Tensors: a shape, a device, and contiguous row-major storage (NCHW for images).
//!
//! Storage sits behind an `Arc`, so cloning a tensor is cheap and shares the data: the tape
//! keeps clones of the inputs that a backward pass needs. Each tensor made by an op gets a
//! fresh id; a clone keeps the id (it *is* the same tensor). Copies between host and device
//! happen only in `from_vec`/`to_vec`/`to_device`, never behind an op's back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::device::{grid_1d, Device, DeviceBuf, Elem, Gpu};
use crate::error::{Error, Result};
use crate::ptx::Module;

/// Identifies a tensor on the tape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    pub fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// The data of a tensor.
pub enum Storage<T: Elem> {
    Cpu(Vec<T>),
    Cuda { gpu: Arc<Gpu>, buf: DeviceBuf<T> },
}

pub struct Tensor<T: Elem = f32> {
    id: TensorId,
    shape: Vec<usize>,
    data: Arc<Storage<T>>,
    relu: ReluFact,
}

/// What is known of a tensor's values with respect to a ReLU, so that a backward pass can skip
/// the ReLU's masking pass where a consumer has already masked (see `ops::relu`). Ops set it;
/// a fresh tensor, and one whose data was changed in place, has `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReluFact {
    #[default]
    None,
    /// The output of a ReLU (standalone or fused into a conv or linear layer): every value is
    /// max(., 0), so the ReLU's gradient is zero exactly where the value is not positive.
    Output,
    /// A gradient with respect to the ReLU output of this id, already zero wherever that ReLU's
    /// gradient is (max-pool's backward makes it so): the ReLU's backward passes it through.
    MaskedFor(TensorId),
}

impl ReluFact {
    /// `Output` for the output of a layer with a fused ReLU (`relu`), else `None`.
    pub fn output_if(relu: bool) -> ReluFact {
        if relu {
            ReluFact::Output
        } else {
            ReluFact::None
        }
    }
}

impl<T: Elem> Clone for Tensor<T> {
    fn clone(&self) -> Self {
        Tensor { id: self.id, shape: self.shape.clone(), data: self.data.clone(), relu: self.relu }
    }
}

impl<T: Elem> std::fmt::Debug for Tensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?}, {})", self.id, self.shape, self.device().label())
    }
}

/// Class labels, one per example.
pub type Labels = Tensor<u32>;
/// Raw 8-bit images, (N, 1, H, W).
pub type Images = Tensor<u8>;

impl<T: Elem> Tensor<T> {
    /// Wraps storage that an op produced. `storage` must hold `shape.iter().product()` elements.
    pub fn from_storage(shape: Vec<usize>, storage: Storage<T>) -> Self {
        debug_assert_eq!(storage_len(&storage), shape.iter().product::<usize>());
        Tensor { id: TensorId::fresh(), shape, data: Arc::new(storage), relu: ReluFact::None }
    }

    /// This tensor, with `fact` known of its values (see `ReluFact`; only the op that made the
    /// values can know it).
    pub fn with_relu_fact(mut self, fact: ReluFact) -> Self {
        self.set_relu_fact(fact);
        self
    }

    pub fn set_relu_fact(&mut self, fact: ReluFact) {
        self.relu = fact;
    }

    pub fn relu_fact(&self) -> ReluFact {
        self.relu
    }

    /// A tensor holding `data` on `device` (copied there if it is a GPU).
    pub fn from_vec(shape: &[usize], data: Vec<T>, device: &Device) -> Result<Self> {
        let want: usize = shape.iter().product();
        if data.len() != want {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("{want} elements for shape {shape:?}"),
                format!("{}", data.len()),
            ));
        }
        let storage = match device {
            Device::Cpu => Storage::Cpu(data),
            Device::Cuda(gpu) => Storage::Cuda { gpu: gpu.clone(), buf: gpu.upload(&data)? },
        };
        Ok(Self::from_storage(shape.to_vec(), storage))
    }

    pub fn zeros(shape: &[usize], device: &Device) -> Result<Self> {
        let n: usize = shape.iter().product();
        let storage = match device {
            Device::Cpu => Storage::Cpu(vec![T::default(); n]),
            Device::Cuda(gpu) => Storage::Cuda { gpu: gpu.clone(), buf: gpu.zeros(n)? },
        };
        Ok(Self::from_storage(shape.to_vec(), storage))
    }

    pub fn id(&self) -> TensorId {
        self.id
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn device(&self) -> Device {
        match &*self.data {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda { gpu, .. } => Device::Cuda(gpu.clone()),
        }
    }

    pub fn storage(&self) -> &Storage<T> {
        &self.data
    }

    /// Mutable access to the data, for in-place updates (SGD). Fails while a clone of this
    /// tensor is alive elsewhere (for example on a tape that was not dropped).
    /// The tensor's `ReluFact` is dropped: new values may not keep it.
    pub fn storage_mut(&mut self) -> Result<&mut Storage<T>> {
        self.relu = ReluFact::None;
        let id = self.id;
        Arc::get_mut(&mut self.data).ok_or_else(|| {
            Error::Invalid(format!("tensor {id:?} is shared (a tape still holds it) and cannot be updated in place"))
        })
    }

    /// Whether another tensor (a clone or a view) shares this one's data, so that it cannot be
    /// updated in place.
    pub fn is_shared(&self) -> bool {
        Arc::strong_count(&self.data) > 1
    }

    /// The host data, when the tensor is on the CPU.
    pub fn cpu(&self) -> Option<&[T]> {
        match &*self.data {
            Storage::Cpu(v) => Some(v),
            Storage::Cuda { .. } => None,
        }
    }

    /// The device buffer and its GPU, when the tensor is on a GPU.
    pub fn cuda(&self) -> Option<(&Arc<Gpu>, &DeviceBuf<T>)> {
        match &*self.data {
            Storage::Cpu(_) => None,
            Storage::Cuda { gpu, buf } => Some((gpu, buf)),
        }
    }

    /// A copy of the data on the host (waits for the GPU).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        match &*self.data {
            Storage::Cpu(v) => Ok(v.clone()),
            Storage::Cuda { gpu, buf } => gpu.download(buf),
        }
    }

    /// A copy on `device` (a fresh id: it is a new tensor).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        match (&*self.data, device) {
            (Storage::Cpu(v), d) => Self::from_vec(&self.shape, v.clone(), d),
            (Storage::Cuda { gpu, buf }, Device::Cuda(g)) if g.ordinal == gpu.ordinal => {
                Ok(Self::from_storage(self.shape.clone(), Storage::Cuda { gpu: gpu.clone(), buf: gpu.duplicate(buf)? }))
            }
            (Storage::Cuda { gpu, buf }, d) => Self::from_vec(&self.shape, gpu.download(buf)?, d),
        }
    }

    /// The same data under another shape with as many elements (shares storage, keeps the id:
    /// use `ops::reshape` inside a recorded graph).
    pub fn view(&self, shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(Error::shape("view", format!("a shape of {} elements", self.len()), format!("{shape:?}")));
        }
        Ok(Tensor { id: self.id, shape: shape.to_vec(), data: self.data.clone(), relu: self.relu })
    }

    /// A new tensor (fresh id) sharing this one's data under another shape with as many
    /// elements: what a recorded reshape/flatten returns, without copying.
    pub fn reshaped(&self, shape: &[usize]) -> Result<Self> {
        let mut t = self.view(shape)?;
        t.id = TensorId::fresh();
        Ok(t)
    }

    /// Copies all of `src` into this tensor's elements `offset..offset + src.len()`, on the
    /// device that holds both (no host round trip).
    pub fn write_at(&mut self, offset: usize, src: &Tensor<T>) -> Result<()> {
        let end = offset + src.len();
        if end > self.len() {
            return Err(Error::shape(
                "write_at",
                format!("at most {} elements from offset {offset}", self.len() - offset.min(self.len())),
                format!("{}", src.len()),
            ));
        }
        common_device("write_at", &[self.device(), src.device()])?;
        match (self.storage_mut()?, src.storage()) {
            (Storage::Cpu(d), Storage::Cpu(s)) => d[offset..end].copy_from_slice(s),
            (Storage::Cuda { gpu, buf }, Storage::Cuda { buf: s, .. }) => gpu.copy_into(buf, offset, s)?,
            _ => unreachable!("checked by common_device"),
        }
        Ok(())
    }

    /// The dims of a rank-4 tensor, or a shape error naming `op`.
    pub fn dims4(&self, op: &'static str) -> Result<[usize; 4]> {
        <[usize; 4]>::try_from(self.shape.as_slice())
            .map_err(|_| Error::shape(op, "a 4-D (N, C, H, W) tensor", format!("shape {:?}", self.shape)))
    }

    /// The dims of a rank-2 tensor, or a shape error naming `op`.
    pub fn dims2(&self, op: &'static str) -> Result<[usize; 2]> {
        <[usize; 2]>::try_from(self.shape.as_slice())
            .map_err(|_| Error::shape(op, "a 2-D (rows, cols) tensor", format!("shape {:?}", self.shape)))
    }

    /// A shape error naming `op` unless this tensor has exactly `shape`.
    pub fn expect_shape(&self, op: &'static str, what: &str, shape: &[usize]) -> Result<()> {
        if self.shape == shape {
            Ok(())
        } else {
            Err(Error::shape(op, format!("{what} of shape {shape:?}"), format!("{:?}", self.shape)))
        }
    }
}

impl Tensor<f32> {
    /// `self += src`, elementwise and in place (kernels/add.cu on CUDA); both of one shape and
    /// device. The tape accumulates the gradients of a tensor that feeds several ops with it.
    pub fn add_assign(&mut self, src: &Tensor) -> Result<()> {
        if self.shape() != src.shape() {
            return Err(Error::shape(
                "add_assign",
                format!("src of shape {:?}", self.shape()),
                format!("{:?}", src.shape()),
            ));
        }
        common_device("add_assign", &[self.device(), src.device()])?;
        let n = src.len() as u64;
        match (self.storage_mut()?, src.storage()) {
            (Storage::Cpu(d), Storage::Cpu(s)) => d.iter_mut().zip(s).for_each(|(d, s)| *d += s),
            (Storage::Cuda { gpu, buf }, Storage::Cuda { buf: s, .. }) => {
                let gpu = gpu.clone();
                crate::launch!(&gpu, Module::Add, "add_assign_f32", grid_1d(n as usize, 256), buf, s, &n)?;
            }
            _ => unreachable!("checked by common_device"),
        }
        Ok(())
    }

    /// A tensor of `shape` filled with `value`, made on the device itself.
    pub fn full(shape: &[usize], value: f32, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let storage = match device {
            Device::Cpu => Storage::Cpu(vec![value; n]),
            Device::Cuda(gpu) => Storage::Cuda { gpu: gpu.clone(), buf: gpu.full_f32(n, value)? },
        };
        Ok(Tensor::from_storage(shape.to_vec(), storage))
    }

    /// A tensor of `shape` holding deterministic pseudo-random values in [lo, hi), a function
    /// of (`salt`, index) only: benchmark and tuning inputs that need no RNG state. Not a
    /// statistical generator (the model's initialisation uses `rand`).
    pub fn synthetic(shape: &[usize], lo: f32, hi: f32, salt: u64, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data = (0..n as u64)
            .map(|i| {
                let mut z = (i ^ salt.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                lo + (hi - lo) * ((z >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect();
        Tensor::from_vec(shape, data, device)
    }
}

fn storage_len<T: Elem>(s: &Storage<T>) -> usize {
    match s {
        Storage::Cpu(v) => v.len(),
        Storage::Cuda { buf, .. } => buf.len(),
    }
}

/// The device shared by all `tensors`, or a DeviceMismatch error naming `op`.
pub fn common_device(op: &'static str, devices: &[Device]) -> Result<Device> {
    let first = devices[0].clone();
    if devices.iter().all(|d| d.same(&first)) {
        Ok(first)
    } else {
        let found: Vec<String> = devices.iter().map(Device::label).collect();
        Err(Error::DeviceMismatch { op, found: found.join(", ") })
    }
}
