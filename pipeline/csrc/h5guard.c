/* A read-only HDF5 file driver ("selfsup-guard") that hands HDF5 the file's bytes with pread, as the default
 * POSIX driver does, and refuses a global heap collection that HDF5's own decoder would loop on forever.
 *
 * HDF5 2.0.0 decodes a collection by walking its objects, each step advancing by the object's size: a damaged
 * collection holding a free-space object (index 0) of size 0 makes that walk advance by 0 bytes, forever, inside
 * HDF5's global lock (so every thread touching HDF5 hangs with it). Collections hold variable-length data:
 * string attributes (`class_names`, `checksum`), the encoded layout's files. HDF5 reads a collection as raw data
 * (H5FD_MEM_DRAW, never through its metadata accumulator): first its first 4096 bytes, then, when its header says
 * it is larger, the rest. At the first read the driver reads the whole collection, which passes `selfsup_gheap_check` (Rust, pipeline/src/source/hdf5/guard.rs,
 * with its tests) before HDF5 decodes the bytes; it looks only at reads shaped like a collection's (starting with
 * the collection signature, 4096 bytes or the collection's size) and refuses only the walk that cannot end.
 *
 * Only what reading needs is implemented; opening for writing is refused (`pack` writes with HDF5's default
 * driver). */

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hdf5.h"
#include "H5FDdevelop.h"

/* Implemented in Rust: 0 when HDF5 may decode the collection `buf[..len]` read at `addr` (sizes in the file take
 * `sizeof_size` bytes); otherwise nonzero, after recording why for `path`. */
extern int selfsup_gheap_check(const char *path, const uint8_t *buf, size_t len, unsigned sizeof_size,
                               uint64_t addr);

typedef struct {
    H5FD_t pub; /* must come first */
    int fd;
    haddr_t eoa;
    haddr_t eof;
    dev_t device;
    ino_t inode;
    unsigned sizeof_size; /* bytes of a "length" field in this file (superblock), 8 unless it says otherwise */
    char *path;
} guard_t;

#define PUSH(minor, msg) H5Epush2(H5E_DEFAULT, __FILE__, __func__, __LINE__, H5E_ERR_CLS, H5E_VFL, minor, "%s", msg)

static int read_all(int fd, void *buf, size_t size, uint64_t addr) {
    uint8_t *p = buf;
    while (size > 0) {
        ssize_t n = pread(fd, p, size > (1u << 30) ? (1u << 30) : size, (off_t)addr);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0) { /* past the end of the file: zeros, as HDF5's POSIX driver does */
            memset(p, 0, size);
            return 0;
        }
        p += n;
        addr += (uint64_t)n;
        size -= (size_t)n;
    }
    return 0;
}

/* The superblock is at 0, 512, 1024, 2048, ... (after a user block); its "size of lengths" byte sits at 14
 * (versions 0 and 1) or 10 (versions 2 and 3). */
static unsigned find_sizeof_size(int fd, uint64_t eof) {
    static const uint8_t sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
    for (uint64_t at = 0; at + 16 <= eof; at = at ? at * 2 : 512) {
        uint8_t b[16];
        if (read_all(fd, b, sizeof b, at) < 0)
            break;
        if (memcmp(b, sig, 8) == 0) {
            unsigned s = b[8] <= 1 ? b[14] : b[10];
            return (s == 2 || s == 4 || s == 8 || s == 16) ? s : 8;
        }
    }
    return 8;
}

static H5FD_t *guard_open(const char *name, unsigned flags, hid_t fapl, haddr_t maxaddr) {
    (void)fapl;
    (void)maxaddr;
    if (flags & (H5F_ACC_RDWR | H5F_ACC_TRUNC | H5F_ACC_CREAT)) {
        PUSH(H5E_BADVALUE, "the selfsup-guard driver only reads");
        return NULL;
    }
    int fd = open(name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        PUSH(H5E_CANTOPENFILE, strerror(errno));
        return NULL;
    }
    struct stat st;
    guard_t *f = NULL;
    if (fstat(fd, &st) < 0 || !(f = calloc(1, sizeof *f)) || !(f->path = strdup(name))) {
        PUSH(H5E_CANTOPENFILE, "cannot stat the file or allocate its driver state");
        free(f);
        close(fd);
        return NULL;
    }
    f->fd = fd;
    f->eof = (haddr_t)st.st_size;
    f->device = st.st_dev;
    f->inode = st.st_ino;
    f->sizeof_size = find_sizeof_size(fd, (uint64_t)st.st_size);
    return &f->pub;
}

static herr_t guard_close(H5FD_t *file) {
    guard_t *f = (guard_t *)file;
    int rc = close(f->fd);
    free(f->path);
    free(f);
    return rc < 0 ? -1 : 0;
}

static int guard_cmp(const H5FD_t *a, const H5FD_t *b) {
    const guard_t *x = (const guard_t *)a, *y = (const guard_t *)b;
    if (x->device != y->device)
        return x->device < y->device ? -1 : 1;
    if (x->inode != y->inode)
        return x->inode < y->inode ? -1 : 1;
    return 0;
}

static herr_t guard_query(const H5FD_t *file, unsigned long *flags) {
    (void)file;
    /* What the POSIX driver says about reading: metadata accumulation and data sieving. */
    if (flags)
        *flags = H5FD_FEAT_ACCUMULATE_METADATA | H5FD_FEAT_DATA_SIEVE | H5FD_FEAT_DEFAULT_VFD_COMPATIBLE;
    return 0;
}

static haddr_t guard_get_eoa(const H5FD_t *file, H5FD_mem_t type) {
    (void)type;
    return ((const guard_t *)file)->eoa;
}

static herr_t guard_set_eoa(H5FD_t *file, H5FD_mem_t type, haddr_t addr) {
    (void)type;
    ((guard_t *)file)->eoa = addr;
    return 0;
}

static haddr_t guard_get_eof(const H5FD_t *file, H5FD_mem_t type) {
    (void)type;
    return ((const guard_t *)file)->eof;
}

static herr_t guard_get_handle(H5FD_t *file, hid_t fapl, void **handle) {
    (void)fapl;
    *handle = &((guard_t *)file)->fd;
    return 0;
}

/* 0 unless `buf[..size]`, read at `addr`, is the start of a global heap collection that HDF5 would loop on. HDF5
 * reads a collection's first 4096 bytes, then the rest of it as a second read: the whole collection is read here
 * at the first, so that the check sees all of it before HDF5 decodes any. */
static int check_collection(guard_t *f, const uint8_t *buf, size_t size, haddr_t addr) {
    unsigned l = f->sizeof_size;
    if (size < 8 + l || l > 8 || memcmp(buf, "GCOL\1", 5) != 0)
        return 0;
    uint64_t total = 0;
    for (unsigned i = 0; i < l; i++)
        total |= (uint64_t)buf[8 + i] << (8 * i);
    if (size != 4096 || total <= size || addr >= f->eof || total > f->eof - addr || total > ((uint64_t)1 << 30))
        return selfsup_gheap_check(f->path, buf, size, l, addr);
    uint8_t *whole = malloc((size_t)total);
    if (!whole)
        return 0; /* HDF5 allocates as much for it next, and reports the failure */
    int rc = read_all(f->fd, whole, (size_t)total, addr) < 0 ? 0 : selfsup_gheap_check(f->path, whole, (size_t)total, l, addr);
    free(whole);
    return rc;
}

static herr_t guard_read(H5FD_t *file, H5FD_mem_t type, hid_t dxpl, haddr_t addr, size_t size, void *buf) {
    (void)dxpl;
    guard_t *f = (guard_t *)file;
    if (addr == HADDR_UNDEF || addr + size < addr) {
        PUSH(H5E_OVERFLOW, "read address overflows");
        return -1;
    }
    if (read_all(f->fd, buf, size, addr) < 0) {
        PUSH(H5E_READERROR, strerror(errno));
        return -1;
    }
    /* HDF5 reads global heap collections as raw data (H5F_block_read maps H5FD_MEM_GHEAP to H5FD_MEM_DRAW). */
    if ((type == H5FD_MEM_DRAW || type == H5FD_MEM_GHEAP) && check_collection(f, buf, size, addr) != 0) {
        PUSH(H5E_READERROR, "damaged global heap collection (refused by selfsup before HDF5 loops on it)");
        return -1;
    }
    return 0;
}

static herr_t guard_write(H5FD_t *file, H5FD_mem_t type, hid_t dxpl, haddr_t addr, size_t size, const void *buf) {
    (void)file;
    (void)type;
    (void)dxpl;
    (void)addr;
    (void)size;
    (void)buf;
    PUSH(H5E_WRITEERROR, "the selfsup-guard driver only reads");
    return -1;
}

static const H5FD_class_t guard_class = {
    .version = H5FD_CLASS_VERSION,
    .value = (H5FD_class_value_t)0x5e1f,
    .name = "selfsup-guard",
    .maxaddr = (haddr_t)INT64_MAX,
    .fc_degree = H5F_CLOSE_WEAK,
    .open = guard_open,
    .close = guard_close,
    .cmp = guard_cmp,
    .query = guard_query,
    .get_eoa = guard_get_eoa,
    .set_eoa = guard_set_eoa,
    .get_eof = guard_get_eof,
    .get_handle = guard_get_handle,
    .read = guard_read,
    .write = guard_write,
    .fl_map = H5FD_FLMAP_DICHOTOMY,
};

/* The driver's id (registered on the first call; HDF5's global lock must be held), or a negative value. */
hid_t selfsup_h5guard_driver(void) {
    static hid_t id = H5I_INVALID_HID;
    if (id < 0 || H5Iis_valid(id) <= 0)
        id = H5FDregister(&guard_class);
    return id;
}

/* Opens `path` read-only through the driver; a negative value (with HDF5's error stack set) on failure. The
 * caller holds HDF5's global lock. */
hid_t selfsup_h5guard_open(const char *path) {
    hid_t driver = selfsup_h5guard_driver();
    if (driver < 0)
        return H5I_INVALID_HID;
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0)
        return H5I_INVALID_HID;
    hid_t file = H5I_INVALID_HID;
    if (H5Pset_driver(fapl, driver, NULL) >= 0)
        file = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    H5Pclose(fapl);
    return file;
}
