/* Types and the few libc calls the shared guest code uses, for both builds: the
 * freestanding guest (guest.h) and the hosted test build (libc), selected by
 * COLOCORE_HOSTED. */
#ifndef COLOCORE_NETTYPES_H
#define COLOCORE_NETTYPES_H

#ifdef COLOCORE_HOSTED
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#else
#include "guest.h"
typedef int int32_t;
typedef short int16_t;
#endif

#endif
