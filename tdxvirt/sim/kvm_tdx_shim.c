/*
 * The emulated TDX host's kernel answers, for one libvirt daemon only (LD_PRELOAD).
 *
 * libvirt's qemu driver asks the host kernel two things no file can answer, because
 * they are ioctls on character devices:
 *   - ioctl(/dev/kvm, KVM_CHECK_EXTENSION, cap): KVM_CAP_VM_TYPES (235) must have bit
 *     KVM_X86_TDX_VM (5) set before domain capabilities say <tdx supported='yes'/>;
 *     KVM_CAP_NR_VCPUS / KVM_CAP_MAX_VCPUS give the domain capabilities' vcpu limit.
 *   - ioctl(/dev/iommu, IOMMU_OPTION, ...): libvirt's check that iommufd works before
 *     it opens /dev/iommu for a hostdev with <driver iommufd='yes'/>.
 * And one thing this machine kind does not allow: libvirt raises RLIMIT_MEMLOCK of a
 * QEMU with VFIO/iommufd devices to guest memory + 1 GiB, which needs CAP_SYS_RESOURCE;
 * the sandbox here withholds that capability even from root. Such a raise that the
 * kernel refuses with EPERM is reported as done: the QEMU that runs here has no VFIO
 * device and pins no memory. Every other limit change goes to the C library.
 * And one thing a file tree cannot be: sysfs. libvirt's node devices come from libudev,
 * which accepts a device directory only on a file system of type sysfs (fstatfs), and
 * the simulated GPU's directory (bound over /sys/devices/pci0000:00 in the namespace)
 * is an ordinary directory; below /sys, fstatfs reports sysfs's type, so libvirt lists
 * the simulated GPU as a node device (virt-xml and virt-manager add it by address).
 *
 * In the emulated host's mount namespace /dev/kvm and /dev/iommu are inert nodes
 * (the numbers of /dev/null, never the real devices), so these ioctls would fail with
 * ENOTTY. This interposer answers them as a TDX host's kernel (Linux >= 6.16) would,
 * and passes every other ioctl to the C library untouched. It is loaded into the
 * simulated host's libvirtd only; QEMU processes never see it (libvirt gives QEMU a
 * clean environment).
 *
 * Numbers: include/uapi/linux/kvm.h (KVMIO 0xAE, KVM_CHECK_EXTENSION _IO(KVMIO, 0x03),
 * KVM_CAP_NR_VCPUS 9, KVM_CAP_MAX_VCPUS 66, KVM_CAP_VM_TYPES 235), arch/x86 uapi
 * (KVM_X86_DEFAULT_VM 0, KVM_X86_TDX_VM 5), include/uapi/linux/iommufd.h
 * (IOMMUFD_TYPE ';', IOMMUFD_CMD_OPTION 0x87).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/types.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/vfs.h>
#include <unistd.h>

#define KVM_CHECK_EXTENSION 0xAE03UL
#define KVM_CAP_NR_VCPUS 9
#define KVM_CAP_MAX_VCPUS 66
#define KVM_CAP_VM_TYPES 235
#define VM_TYPES_DEFAULT_AND_TDX ((1 << 0) | (1 << 5))
#define IOMMU_OPTION 0x3B87UL
#define RLIMIT_MEMLOCK_RESOURCE 8 /* include/uapi/asm-generic/resource.h */
#define SYSFS_MAGIC 0x62656572 /* include/uapi/linux/magic.h */

/* The path an open file descriptor names (empty when it cannot be read). */
static void fd_path(int fd, char *target, size_t size)
{
    char link[64];
    ssize_t n;

    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    n = readlink(link, target, size - 1);
    target[n < 0 ? 0 : n] = '\0';
}

static int fd_is(int fd, const char *path)
{
    char target[64];

    fd_path(fd, target, sizeof(target));
    return strcmp(target, path) == 0;
}

int ioctl(int fd, unsigned long request, ...)
{
    static int (*real_ioctl)(int, unsigned long, void *);
    va_list ap;
    void *arg;

    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);

    if (request == KVM_CHECK_EXTENSION && fd_is(fd, "/dev/kvm")) {
        switch ((unsigned long) arg) {
        case KVM_CAP_VM_TYPES:
            return VM_TYPES_DEFAULT_AND_TDX;
        case KVM_CAP_NR_VCPUS:
            return 240;
        case KVM_CAP_MAX_VCPUS:
            return 4096;
        default:
            return 0;
        }
    }
    if (request == IOMMU_OPTION && fd_is(fd, "/dev/iommu"))
        return 0;

    if (!real_ioctl)
        real_ioctl = (int (*)(int, unsigned long, void *)) dlsym(RTLD_NEXT, "ioctl");
    return real_ioctl(fd, request, arg);
}

/* RLIMIT_MEMLOCK raises refused for want of CAP_SYS_RESOURCE count as done (see top).
 * The limit structures pass through untouched, so they are plain pointers here. */
static int memlock_refused(int resource, int result)
{
    return result != 0 && errno == EPERM && resource == RLIMIT_MEMLOCK_RESOURCE;
}

#define WRAP_PRLIMIT(name)                                                            \
    int name(pid_t pid, int resource, const void *new_limit, void *old_limit)         \
    {                                                                                 \
        static int (*real)(pid_t, int, const void *, void *);                         \
        int result;                                                                   \
        if (!real)                                                                    \
            real = (int (*)(pid_t, int, const void *, void *)) dlsym(RTLD_NEXT, #name); \
        result = real(pid, resource, new_limit, old_limit);                           \
        return memlock_refused(resource, result) ? 0 : result;                        \
    }

#define WRAP_SETRLIMIT(name)                                                          \
    int name(int resource, const void *limit)                                         \
    {                                                                                 \
        static int (*real)(int, const void *);                                        \
        int result;                                                                   \
        if (!real)                                                                    \
            real = (int (*)(int, const void *)) dlsym(RTLD_NEXT, #name);              \
        result = real(resource, limit);                                               \
        return memlock_refused(resource, result) ? 0 : result;                        \
    }

WRAP_PRLIMIT(prlimit)
WRAP_PRLIMIT(prlimit64)
WRAP_SETRLIMIT(setrlimit)
WRAP_SETRLIMIT(setrlimit64)

/* Below /sys in the namespace everything is sysfs or stands in for it (see top). */
static int below_sys(int fd)
{
    char target[4096];

    fd_path(fd, target, sizeof(target));
    return strncmp(target, "/sys/", 5) == 0;
}

#define WRAP_FSTATFS(name, type)                                                      \
    int name(int fd, struct type *buf)                                                \
    {                                                                                 \
        static int (*real)(int, struct type *);                                       \
        int result;                                                                   \
        if (!real)                                                                    \
            real = (int (*)(int, struct type *)) dlsym(RTLD_NEXT, #name);             \
        result = real(fd, buf);                                                       \
        if (result == 0 && below_sys(fd))                                             \
            buf->f_type = SYSFS_MAGIC;                                                \
        return result;                                                                \
    }

WRAP_FSTATFS(fstatfs, statfs)
WRAP_FSTATFS(fstatfs64, statfs64)
