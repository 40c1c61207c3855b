//! virtio-mmio register offsets and status bits (virtio 1.2, section 4.2.2).

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Version 2: the non-legacy register layout.
pub const VERSION: u32 = 2;
/// Our vendor ID ("RVMM" is not registered anywhere; the driver ignores it).
pub const VENDOR_ID: u32 = 0x4d4d_5652;

/// MagicValue (R).
pub const REG_MAGIC_VALUE: u64 = 0x000;
/// Version (R).
pub const REG_VERSION: u64 = 0x004;
/// DeviceID (R).
pub const REG_DEVICE_ID: u64 = 0x008;
/// VendorID (R).
pub const REG_VENDOR_ID: u64 = 0x00c;
/// DeviceFeatures (R), the 32-bit word chosen by DeviceFeaturesSel.
pub const REG_DEVICE_FEATURES: u64 = 0x010;
/// DeviceFeaturesSel (W).
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
/// DriverFeatures (W), the 32-bit word chosen by DriverFeaturesSel.
pub const REG_DRIVER_FEATURES: u64 = 0x020;
/// DriverFeaturesSel (W).
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
/// QueueSel (W).
pub const REG_QUEUE_SEL: u64 = 0x030;
/// QueueNumMax (R).
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
/// QueueNum (W).
pub const REG_QUEUE_NUM: u64 = 0x038;
/// QueueReady (RW).
pub const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify (W): handled by a KVM ioeventfd per queue (datamatch = queue index).
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
/// InterruptStatus (R).
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
/// InterruptACK (W).
pub const REG_INTERRUPT_ACK: u64 = 0x064;
/// Status (RW).
pub const REG_STATUS: u64 = 0x070;
/// QueueDescLow (W).
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
/// QueueDescHigh (W).
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
/// QueueDriverLow (W): the available ring.
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
/// QueueDriverHigh (W).
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
/// QueueDeviceLow (W): the used ring.
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// QueueDeviceHigh (W).
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// ConfigGeneration (R).
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const REG_CONFIG: u64 = 0x100;

/// Status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Status: the guest has a driver for it.
pub const STATUS_DRIVER: u32 = 2;
/// Status: the driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Status: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
/// Status: the driver gave up.
pub const STATUS_FAILED: u32 = 0x80;

/// InterruptStatus bit: used buffer notification.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: configuration change.
pub const INT_CONFIG_CHANGE: u32 = 2;

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// VIRTIO_RING_F_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
