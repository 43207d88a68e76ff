package docker

// SetMigrateHook makes b call hook at each step of a volume migration
// ("copying", "copied", "removed"); an error stops the migration there, as
// a killed worker would.
func SetMigrateHook(b *Backend, hook func(step string) error) { b.migrateHook = hook }

// BrainDir is the engine's brain directory under b's data root.
func BrainDir(b *Backend, engineID string) string { return b.brainDir(engineID) }
