// A cache of large memory blocks, preloaded (LD_PRELOAD) in front of glibc malloc.
//
// Why: XLA's CPU runtime mallocs each execution's scratch buffer (gigabytes for a
// ResNet-18 step) and frees it when the step ends. The CPU backend already keeps
// freed memory in glibc's heap (`process.configure_malloc`), but with asynchronous
// dispatch the next step sometimes allocates its buffer before the previous step
// has freed its own; glibc takes the second one from fresh pages at the top of the
// heap and later fragments it: storms of page faults and slower steps, in some
// steps and not others (BUILD_NOTES.md). Here every request of at least
// CXRJAX_BLOCK_CACHE_MB megabytes (default 64) gets its own `mmap`ed block; a
// freed block is kept, whole, for the next request of about its size, so the
// same pages (two blocks when steps overlap) serve every step. Nothing else ever
// lands in them.
//
// Smaller requests, and pointers that are not ours, go to glibc's own entry
// points (`__libc_malloc` and friends), unchanged. Idle blocks beyond
// CXRJAX_BLOCK_CACHE_IDLE_MB (default: a quarter of physical memory) are
// returned to the system, least recently used first.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

#define MAX_BLOCKS 256
#define PAGE 4096

typedef struct {
  uintptr_t addr;
  size_t mapped;     // bytes mapped (a multiple of PAGE)
  size_t requested;  // bytes asked for by the current (or last) user
  int in_use;
  uint64_t last_used;
} block_t;

static block_t blocks[MAX_BLOCKS];
static int n_blocks;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
// Every block lies in [lo, hi): free() of any other pointer skips the lock.
static volatile uintptr_t lo = UINTPTR_MAX, hi = 0;
static size_t threshold = (size_t)64 << 20;
static size_t idle_cap = (size_t)4 << 30;
static size_t idle_bytes;
static uint64_t clock_ticks;
// Counters, read by tests and the benchmark through cxrjax_block_cache_stats().
static uint64_t n_mapped, n_reused, n_unmapped;
static size_t (*libc_usable_size)(void *);

static size_t env_mb(const char *name, size_t fallback) {
  const char *s = getenv(name);
  if (s == NULL || *s == '\0') return fallback;
  char *end;
  unsigned long long v = strtoull(s, &end, 10);
  return *end == '\0' ? (size_t)v << 20 : fallback;
}

static void before_fork(void) { pthread_mutex_lock(&lock); }
static void after_fork(void) { pthread_mutex_unlock(&lock); }

__attribute__((constructor)) static void init(void) {
  long pages = sysconf(_SC_PHYS_PAGES);
  if (pages > 0) idle_cap = (size_t)pages * PAGE / 4;
  threshold = env_mb("CXRJAX_BLOCK_CACHE_MB", threshold);
  if (threshold < PAGE) threshold = PAGE;
  idle_cap = env_mb("CXRJAX_BLOCK_CACHE_IDLE_MB", idle_cap);
  pthread_atfork(before_fork, after_fork, after_fork);
}

// The index of the block that starts at p, or -1. Caller holds the lock.
static int find(uintptr_t p) {
  for (int i = 0; i < n_blocks; i++)
    if (blocks[i].addr == p) return i;
  return -1;
}

static void unmap(int i) {
  munmap((void *)blocks[i].addr, blocks[i].mapped);
  idle_bytes -= blocks[i].mapped;
  blocks[i] = blocks[--n_blocks];
  n_unmapped++;
}

// Returns idle blocks to the system, least recently used first, until at most
// `cap` idle bytes remain. Caller holds the lock.
static void trim_to(size_t cap) {
  while (idle_bytes > cap) {
    int oldest = -1;
    for (int i = 0; i < n_blocks; i++)
      if (!blocks[i].in_use && (oldest < 0 || blocks[i].last_used < blocks[oldest].last_used)) oldest = i;
    if (oldest < 0) return;
    unmap(oldest);
  }
}

// A block of at least n bytes, or NULL (then the caller asks glibc). *fresh says
// whether its pages are new from the system (and so zero).
static void *take(size_t n, int *fresh) {
  size_t want = (n + PAGE - 1) & ~(size_t)(PAGE - 1);
  if (want < n) return NULL;  // overflow
  pthread_mutex_lock(&lock);
  // Best fit among idle blocks, and never one more than 25% too large: a 3 GB
  // scratch block must not be spent on a 70 MB request.
  int best = -1;
  for (int i = 0; i < n_blocks; i++) {
    block_t *b = &blocks[i];
    if (!b->in_use && b->mapped >= want && b->mapped - want <= want / 4 &&
        (best < 0 || b->mapped < blocks[best].mapped))
      best = i;
  }
  void *p = NULL;
  if (best >= 0) {
    block_t *b = &blocks[best];
    b->in_use = 1;
    b->requested = n;
    b->last_used = ++clock_ticks;
    idle_bytes -= b->mapped;
    n_reused++;
    *fresh = 0;
    p = (void *)b->addr;
  } else {
    if (n_blocks == MAX_BLOCKS) trim_to(0);  // make room in the table
    if (n_blocks < MAX_BLOCKS) {
      void *m = mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m != MAP_FAILED) {
        blocks[n_blocks++] = (block_t){(uintptr_t)m, want, n, 1, ++clock_ticks};
        if ((uintptr_t)m < lo) lo = (uintptr_t)m;
        if ((uintptr_t)m + want > hi) hi = (uintptr_t)m + want;
        n_mapped++;
        *fresh = 1;
        p = m;
      }
    }
  }
  pthread_mutex_unlock(&lock);
  return p;
}

// Takes p back if it is one of ours; returns whether it was.
static int give_back(void *p) {
  uintptr_t a = (uintptr_t)p;
  if (a < lo || a >= hi) return 0;
  pthread_mutex_lock(&lock);
  int i = find(a);
  if (i >= 0) {
    blocks[i].in_use = 0;
    blocks[i].last_used = ++clock_ticks;
    idle_bytes += blocks[i].mapped;
    trim_to(idle_cap);
  }
  pthread_mutex_unlock(&lock);
  return i >= 0;
}

// The size the user asked for if p is one of our blocks in use, else 0.
static size_t our_size(void *p) {
  uintptr_t a = (uintptr_t)p;
  if (a < lo || a >= hi) return 0;
  pthread_mutex_lock(&lock);
  int i = find(a);
  size_t n = i >= 0 ? blocks[i].requested : 0;
  pthread_mutex_unlock(&lock);
  return n;
}

void *malloc(size_t n) {
  if (n >= threshold) {
    int fresh;
    void *p = take(n, &fresh);
    if (p) return p;
  }
  return __libc_malloc(n);
}

void free(void *p) {
  if (p && !give_back(p)) __libc_free(p);
}

// C23's sized frees (glibc 2.39 and later would otherwise pass our blocks to its own free).
void free_sized(void *p, size_t n) {
  (void)n;
  free(p);
}

void free_aligned_sized(void *p, size_t alignment, size_t n) {
  (void)alignment;
  (void)n;
  free(p);
}

void *calloc(size_t count, size_t size) {
  size_t n;
  if (__builtin_mul_overflow(count, size, &n)) {
    errno = ENOMEM;
    return NULL;
  }
  if (n >= threshold) {
    int fresh;
    void *p = take(n, &fresh);
    if (p) {
      if (!fresh) memset(p, 0, n);
      return p;
    }
  }
  return __libc_calloc(count, size);
}

void *realloc(void *p, size_t n) {
  size_t old = p ? our_size(p) : 0;
  if (old == 0) {
    if (p == NULL) return malloc(n);
    return __libc_realloc(p, n);  // glibc's block stays glibc's, whatever its new size
  }
  if (n == 0) {
    free(p);
    return NULL;
  }
  void *q = malloc(n);
  if (q == NULL) return NULL;
  memcpy(q, p, old < n ? old : n);
  free(p);
  return q;
}

void *reallocarray(void *p, size_t count, size_t size) {
  size_t n;
  if (__builtin_mul_overflow(count, size, &n)) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(p, n);
}

// Blocks are page-aligned, so any alignment up to a page is free.
static void *aligned(size_t alignment, size_t n) {
  if (n >= threshold && alignment <= PAGE) {
    int fresh;
    void *p = take(n, &fresh);
    if (p) return p;
  }
  return __libc_memalign(alignment, n);
}

int posix_memalign(void **out, size_t alignment, size_t n) {
  if (alignment % sizeof(void *) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
  void *p = aligned(alignment, n);
  if (p == NULL) return ENOMEM;
  *out = p;
  return 0;
}

void *aligned_alloc(size_t alignment, size_t n) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    errno = EINVAL;
    return NULL;
  }
  return aligned(alignment, n);
}

void *memalign(size_t alignment, size_t n) { return aligned(alignment, n); }

size_t malloc_usable_size(void *p) {
  if (p == NULL) return 0;
  size_t n = our_size(p);
  if (n) return n;
  // Looked up on first use, not in the constructor: another library's constructor may
  // call this before ours has run.
  if (libc_usable_size == NULL) libc_usable_size = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  return libc_usable_size ? libc_usable_size(p) : 0;
}

// For tests and the benchmark (ctypes): blocks mapped, requests served from a
// kept block, blocks returned, and the threshold in bytes.
void cxrjax_block_cache_stats(uint64_t out[4]) {
  pthread_mutex_lock(&lock);
  out[0] = n_mapped;
  out[1] = n_reused;
  out[2] = n_unmapped;
  out[3] = threshold;
  pthread_mutex_unlock(&lock);
}
