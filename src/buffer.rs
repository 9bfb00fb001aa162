//! `DeviceBuf`: a device buffer that goes back to its device's buffer cache (`buffer_pool.rs`) when
//! dropped, so that steady-state training allocates nothing. On a GPU it holds a cudarc
//! `CudaSlice`; on the kernel emulator (`Device::parse("emu")`, see emu/) it holds host memory
//! that the emulated kernels address directly.
//!
//! Kernels receive buffers as their device pointer: `launch!` passes `&DeviceBuf` /
//! `&mut DeviceBuf` to cudarc's launch builder (the impls below delegate to cudarc's own for
//! `CudaSlice`) or, on the emulator, a pointer to the buffer's host address (`EmuArg`).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchArgs, PushKernelArg, ValidAsZeroBits};

use crate::buffer_pool::BufferPool;

/// Element types that live in device buffers.
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// What the emulator fills a buffer from `Gpu::uninit` with, as a GPU gives such a buffer
    /// unspecified contents: a NaN, or an index far out of any buffer (not `u32::MAX`, which
    /// max-pool's argmax takes to mean "no gradient").
    const POISON: Self;
}
impl Elem for f32 {
    const POISON: f32 = f32::from_bits(0xffff_ffff);
}
impl Elem for u32 {
    const POISON: u32 = 0xa5a5_a5a5;
}
impl Elem for u8 {
    const POISON: u8 = 0xa5;
}
impl Elem for u64 {
    const POISON: u64 = 0xa5a5_a5a5_a5a5_a5a5;
}

/// Host memory standing in for device memory on the emulator.
///
/// A guard tail of [`GUARD_BYTES`] follows the elements and is marked unaddressable for
/// AddressSanitizer when the emulator is built with it (scripts/emu-asan.sh): ASan's own red zones
/// guard the end of small allocations only, and a kernel that reads one element past a large
/// buffer would otherwise go unseen.
pub struct HostMem<T> {
    /// The elements, then the guard tail (`len..`).
    data: Vec<T>,
    len: usize,
    /// `data`'s address: the "device pointer" an emulated kernel receives (by reference, as
    /// cuLaunchKernel takes its arguments).
    addr: u64,
}

/// The size of a [`HostMem`]'s guard tail: a few elements of any type.
pub const GUARD_BYTES: usize = 64;

impl<T: Default + Clone> HostMem<T> {
    /// `len` elements of `T::default()`.
    pub fn zeroed(len: usize) -> Self {
        let guard = GUARD_BYTES.div_ceil(std::mem::size_of::<T>().max(1));
        let mut data = vec![T::default(); len + guard];
        let addr = data.as_mut_ptr() as u64;
        // SAFETY: the guard is inside `data`, which lives until drop (which unpoisons it).
        unsafe { ptxgrad_emu::poison(data[len..].as_ptr().cast(), guard * std::mem::size_of::<T>(), true) };
        HostMem { data, len, addr }
    }
}

impl<T> HostMem<T> {
    pub fn data(&self) -> &[T] {
        &self.data[..self.len]
    }
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data[..self.len]
    }
}

impl<T> Drop for HostMem<T> {
    fn drop(&mut self) {
        let tail = &self.data[self.len..];
        // SAFETY: the guard poisoned in `zeroed`, still inside `data`.
        unsafe { ptxgrad_emu::poison(tail.as_ptr().cast(), std::mem::size_of_val(tail), false) };
    }
}

/// Where a buffer's memory is.
pub enum Mem<T> {
    Cuda(CudaSlice<T>),
    Host(HostMem<T>),
}

impl<T> Mem<T> {
    pub fn len(&self) -> usize {
        match self {
            Mem::Cuda(s) => s.len(),
            Mem::Host(h) => h.len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct DeviceBuf<T: Elem> {
    // Some until dropped.
    mem: Option<Mem<T>>,
    pool: Arc<BufferPool>,
}

impl<T: Elem> DeviceBuf<T> {
    pub(crate) fn new(mem: Mem<T>, pool: Arc<BufferPool>) -> Self {
        DeviceBuf { mem: Some(mem), pool }
    }
    pub fn mem(&self) -> &Mem<T> {
        self.mem.as_ref().expect("present until drop")
    }
    pub fn mem_mut(&mut self) -> &mut Mem<T> {
        self.mem.as_mut().expect("present until drop")
    }
    pub fn len(&self) -> usize {
        self.mem().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Elem> Drop for DeviceBuf<T> {
    fn drop(&mut self) {
        if let Some(mem) = self.mem.take() {
            self.pool.give(mem.len(), mem.len() * std::mem::size_of::<T>(), mem);
        }
    }
}

// One device is one backend: a host buffer never reaches cudarc, nor a CUDA buffer the emulator.
const WRONG_BACKEND: &str = "a buffer used on another backend than the one that allocated it";

// SAFETY: delegates to cudarc's impls for &CudaSlice / &mut CudaSlice, which push the buffer's
// device pointer (it lives as long as the borrow of the DeviceBuf).
unsafe impl<'a, 'b: 'a, T: Elem> PushKernelArg<&'b DeviceBuf<T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b DeviceBuf<T>) -> &mut Self {
        match arg.mem() {
            Mem::Cuda(slice) => self.arg(slice),
            Mem::Host(_) => unreachable!("{WRONG_BACKEND}"),
        }
    }
}

// SAFETY: as above.
unsafe impl<'a, 'b: 'a, T: Elem> PushKernelArg<&'b mut DeviceBuf<T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b mut DeviceBuf<T>) -> &mut Self {
        match arg.mem_mut() {
            Mem::Cuda(slice) => self.arg(slice),
            Mem::Host(_) => unreachable!("{WRONG_BACKEND}"),
        }
    }
}

/// A kernel argument as the emulator takes it: a pointer to the argument's value (for a buffer,
/// to its address).
pub trait EmuArg {
    fn emu_ptr(&self) -> *mut c_void;
}

impl<T: Elem> EmuArg for &DeviceBuf<T> {
    fn emu_ptr(&self) -> *mut c_void {
        match self.mem() {
            Mem::Host(h) => &h.addr as *const u64 as *mut c_void,
            Mem::Cuda(_) => unreachable!("{WRONG_BACKEND}"),
        }
    }
}

impl<T: Elem> EmuArg for &mut DeviceBuf<T> {
    fn emu_ptr(&self) -> *mut c_void {
        (&**self).emu_ptr()
    }
}

impl<T: DeviceRepr> EmuArg for &T {
    fn emu_ptr(&self) -> *mut c_void {
        *self as *const T as *mut c_void
    }
}
