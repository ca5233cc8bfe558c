"""prisma_mm.cache"""
