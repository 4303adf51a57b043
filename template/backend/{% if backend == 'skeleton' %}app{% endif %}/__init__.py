# Yours: `copier update` never overwrites or deletes this file.
