/*
 * Strict configuration files: the keys an object may have, checked before its values are read,
 * so that a typo is an error that names the file, the key's path and what was meant, never a
 * default silently used.
 */
#ifndef KVF_CORE_JSONKEYS_H
#define KVF_CORE_JSONKEYS_H

#include <jansson.h>
#include <stddef.h>

/* Checks that every key of object o is one of known (NULL-terminated). where names the object in
 * messages ("cluster.json", "cost.json: instances[2]"). Returns 0, or -1 with "WHERE: unknown key
 * \"stroes\" (did you mean \"stores\"? known: ...)" in err. o not an object: -1 ("must be an
 * object"). */
int kvf__json_keys_check(const json_t *o, const char *const *known, const char *where, char *err,
                         size_t errlen);

#endif
