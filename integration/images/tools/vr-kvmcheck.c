// vr-kvmcheck: prove that /dev/kvm is a working KVM inside the TCG "KVM host".
// Creates a VM and a vCPU, runs a 5-byte real-mode guest ("out 0x10, al; hlt")
// and checks both exits. Prints one summary line; exit 0 on success.
// Built statically by build-tools.sh from Debian's gcc + libc6-dev.
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int fail(const char *what) {
	printf("vr-kvmcheck: %s failed: %s\n", what, strerror(errno));
	return 1;
}

static long now_us(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000L + ts.tv_nsec / 1000;
}

int main(void) {
	static const uint8_t code[] = {0xb0, 0x2a, 0xe6, 0x10, 0xf4}; // mov al,42; out 0x10,al; hlt
	long t0 = now_us();
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) return fail("open /dev/kvm");
	int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
	if (api != KVM_API_VERSION) {
		printf("vr-kvmcheck: KVM_GET_API_VERSION=%d, want %d\n", api, KVM_API_VERSION);
		return 1;
	}
	static const struct { int cap; const char *name; } caps[] = {
		{KVM_CAP_USER_MEMORY, "USER_MEMORY"}, {KVM_CAP_IRQCHIP, "IRQCHIP"},
		{KVM_CAP_IOEVENTFD, "IOEVENTFD"},     {KVM_CAP_IRQFD, "IRQFD"},
		{KVM_CAP_PIT2, "PIT2"},
	};
	for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
		if (ioctl(kvm, KVM_CHECK_EXTENSION, caps[i].cap) <= 0) {
			printf("vr-kvmcheck: capability %s missing\n", caps[i].name);
			return 1;
		}
	}
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) return fail("KVM_CREATE_VM");
	uint8_t *mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) return fail("mmap guest memory");
	memcpy(mem, code, sizeof(code));
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0x1000, .memory_size = 0x1000, .userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) return fail("KVM_SET_USER_MEMORY_REGION");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0) return fail("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size <= 0) return fail("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED) return fail("mmap kvm_run");
	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) return fail("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) return fail("KVM_SET_SREGS");
	struct kvm_regs regs = {.rip = 0x1000, .rax = 0, .rflags = 0x2};
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) return fail("KVM_SET_REGS");
	long t1 = now_us();

	int saw_io = 0;
	for (int i = 0; i < 8; i++) { // bounded: two exits expected
		if (ioctl(vcpu, KVM_RUN, 0) < 0) return fail("KVM_RUN");
		if (run->exit_reason == KVM_EXIT_IO) {
			uint8_t v = *((uint8_t *)run + run->io.data_offset);
			if (run->io.direction != KVM_EXIT_IO_OUT || run->io.port != 0x10 || v != 42) {
				printf("vr-kvmcheck: unexpected IO exit port=0x%x value=%u\n", run->io.port, v);
				return 1;
			}
			saw_io = 1;
		} else if (run->exit_reason == KVM_EXIT_HLT) {
			if (!saw_io) {
				printf("vr-kvmcheck: HLT before the OUT\n");
				return 1;
			}
			printf("vr-kvmcheck: ok api=%d create_us=%ld run_us=%ld\n", api, t1 - t0, now_us() - t1);
			return 0;
		} else {
			printf("vr-kvmcheck: unexpected exit reason %u\n", run->exit_reason);
			return 1;
		}
	}
	printf("vr-kvmcheck: guest did not halt\n");
	return 1;
}
